"""Every broken input of the corpus stops the real Prefect flow at validation: merge, calibrate,
evaluate and register never run, the store holds no new model version, no merge or calibration
folder is left, and the failed report is the FAILED MLflow run of that very flow run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeme.errors import ConfigError
from tests.pipeline.runs import executed_steps
from tests.validation.corpus import CORPUS

pytestmark = pytest.mark.slow

# the tasks a flow may have run when it stops at validation
BEFORE_MERGE = {"clean workspace", "fetch experts", "validate checkpoints"}


def _store(tmp_path: Path):
    from mlflow import MlflowClient

    # the corpus configs register into this store (see tests/validation/corpus.py)
    tracking_uri = f"sqlite:///{tmp_path.parent / 'corpus-mlflow.db'}"
    return MlflowClient(tracking_uri, tracking_uri)


def _failed_validation_runs(client) -> dict[str, object]:
    experiment = client.get_experiment_by_name("corpus")
    if experiment is None:
        return {}
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`mergeme.validation` = 'failed'", max_results=1000
    )
    return {run.info.run_id: run for run in runs}


def _outputs(workspace: Path) -> set[str]:
    return {
        str(path.relative_to(workspace))
        for folder in ("merges", "calibrated")
        if (workspace / folder).is_dir()
        for path in (workspace / folder).iterdir()
    }


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
def test_the_flow_stops_at_validation(case, prefect_harness, tiny_family, dvc_project, tmp_path):
    from flows.pipeline import merge_pipeline
    from mergeme.validation.checkpoints import ValidationFailed

    config_path = case.build(tmp_path, tiny_family, dvc_project)
    client, workspace = _store(tmp_path), tmp_path / "workspace"
    versions_before = len(client.search_model_versions(max_results=1000))
    runs_before, outputs_before = _failed_validation_runs(client), _outputs(workspace)

    state = merge_pipeline(str(config_path), str(workspace), return_state=True)
    expected = ConfigError if case.config_error else ValidationFailed
    with pytest.raises(expected) as error:
        state.result()
    flow_run_id = state.state_details.flow_run_id
    steps = executed_steps(flow_run_id)

    # nothing registered, nothing built
    assert state.is_failed()
    assert len(client.search_model_versions(max_results=1000)) == versions_before
    assert _outputs(workspace) == outputs_before == set()
    new_runs = {k: v for k, v in _failed_validation_runs(client).items() if k not in runs_before}
    if case.config_error:
        assert steps == {}  # the config is refused before any task
        assert all(fragment in str(error.value) for fragment in case.config_error)
        assert new_runs == {}
        return
    assert steps["validate checkpoints"] == "Failed"
    assert set(steps) <= BEFORE_MERGE, steps
    assert set(error.value.kinds) == case.kinds

    # the failed report is this flow run's MLflow run, with both GX sites as HTML
    [run] = new_runs.values()
    assert run.info.run_name == f"validation-{flow_run_id}"
    assert run.info.status == "FAILED"
    assert set(run.data.tags["mergeme.validation.kinds"].split(",")) == case.kinds
    for site in ("data_docs", "data_docs_data"):
        listed = {i.path for i in client.list_artifacts(run.info.run_id, f"validation/{site}")}
        assert f"validation/{site}/index.html" in listed
