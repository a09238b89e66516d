"""Every broken input of the corpus is refused by `mergeme validate` (the real CLI) and by the
validate step, with exactly the expected problem kinds; the step keeps its report as a FAILED
MLflow run. That the whole flow stops there and registers nothing is tested on the same corpus
in tests/pipeline/test_flow_validation.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergeme.cli import app
from tests.validation.corpus import CORPUS

KIND_LINE = re.compile(r"^\s+- \[(\w+)\] ", re.MULTILINE)
STEP_CASES = [case for case in CORPUS if case.kinds]


def test_the_corpus_has_at_least_20_distinct_broken_inputs():
    assert len({case.name for case in CORPUS}) == len(CORPUS) >= 20


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_mergeme_validate_rejects_it(case, tiny_family, dvc_project, tmp_path):
    config = case.build(tmp_path, tiny_family, dvc_project)

    result = CliRunner().invoke(app, ["validate", "-c", str(config)])
    output = result.output

    assert result.exit_code == 1, output
    if case.config_error:
        for fragment in case.config_error:
            assert fragment in output
    else:
        assert "validation failed" in output
        assert set(KIND_LINE.findall(output)) == case.kinds, output


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda case: case.name)
def test_validate_step_stops_and_keeps_a_failed_run(case, tiny_family, dvc_project, tmp_path):
    from mergeme.config import load_config
    from mergeme.pipeline import fetch_step, validate_step
    from mergeme.registry.store import connect
    from mergeme.validation.checkpoints import ValidationFailed
    from mlflow import MlflowClient

    config = load_config(case.build(tmp_path, tiny_family, dvc_project))
    workspace = tmp_path / "workspace"
    connect(config.registry.tracking_uri, workspace)
    client = MlflowClient()

    fetched = fetch_step(config, workspace)
    with pytest.raises(ValidationFailed) as error:
        validate_step(fetched, tmp_path / "report", config, workspace, run_name=case.name)

    assert set(error.value.kinds) == case.kinds
    experiment = client.get_experiment_by_name(config.registry.experiment)
    [run] = client.search_runs(
        [experiment.experiment_id], f"attributes.run_name = '{case.name}'", max_results=5
    )
    assert run.info.status == "FAILED"
    assert set(run.data.tags["mergeme.validation.kinds"].split(",")) == case.kinds
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "validation")}
    assert "validation/validation_report.json" in logged


def test_mergeme_validate_accepts_good_inputs_and_gives_each_run_its_own_folder(
    tiny_family, dvc_project, tmp_path
):
    from mergeme.workspace import workspace_root
    from tests.conftest import write_pipeline_config

    config = write_pipeline_config(tmp_path, tiny_family, dvc_project)
    runs = workspace_root(None) / "validation"  # the session's workspace
    before = set(runs.iterdir()) if runs.is_dir() else set()
    reports = []
    for _ in range(2):
        result = CliRunner().invoke(app, ["validate", "-c", str(config)])
        assert result.exit_code == 0, result.output
        reports.append(Path(result.output.split("report in ")[-1].strip()))

    assert set(runs.iterdir()) - before == {path.parent for path in reports}
    assert reports[0].parent != reports[1].parent
    assert all(path.is_file() for path in reports)
