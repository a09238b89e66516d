"""Broken inputs stop the real Prefect flow at validation: no merge output, nothing
registered, and the failed report kept as a FAILED MLflow run with its Data Docs."""

from __future__ import annotations

import pytest

from mergeme.errors import ConfigError
from tests.validation.corpus import CORPUS

pytestmark = pytest.mark.slow

FLOW_CASES = [
    case
    for case in CORPUS
    if case.name
    in {
        "truncated-shard",
        "nan-tensor",
        "identical-experts",
        "data-differs-from-dvc-lock",
        "unknown-keys-and-wrong-types",
    }
]


def _version_count(tracking_uri: str) -> int:
    from mlflow import MlflowClient

    return len(MlflowClient(tracking_uri, tracking_uri).search_model_versions())


@pytest.mark.parametrize("case", FLOW_CASES, ids=lambda case: case.name)
def test_the_flow_stops_at_validation(case, prefect_harness, tiny_family, dvc_project, tmp_path):
    from flows.pipeline import merge_pipeline
    from mergeme.validation.checkpoints import ValidationFailed
    from mlflow import MlflowClient

    config_path = case.build(tmp_path, tiny_family, dvc_project)
    tracking_uri = f"sqlite:///{tmp_path.parent / 'corpus-mlflow.db'}"
    workspace = tmp_path / "workspace"
    before = _version_count(tracking_uri)

    expected = ConfigError if case.config_error else ValidationFailed
    with pytest.raises(expected) as error:
        merge_pipeline(str(config_path), str(workspace))

    assert not (workspace / "merges").exists()
    assert _version_count(tracking_uri) == before
    if case.config_error:
        assert all(fragment in str(error.value) for fragment in case.config_error)
        return
    assert set(error.value.kinds) == case.kinds

    # the failed report is an MLflow run with both GX sites as HTML
    client = MlflowClient(tracking_uri, tracking_uri)
    experiment = client.get_experiment_by_name("corpus")
    runs = client.search_runs([experiment.experiment_id], "tags.`mergeme.validation` = 'failed'")
    run = next(r for r in runs if r.info.run_name.startswith("validation-"))
    assert run.info.status == "FAILED"
    for site in ("data_docs", "data_docs_data"):
        listed = {i.path for i in client.list_artifacts(run.info.run_id, f"validation/{site}")}
        assert f"validation/{site}/index.html" in listed
