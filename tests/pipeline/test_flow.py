"""The whole pipeline as a real Prefect flow on tiny models, registered in a real MLflow store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

import mergeme
from mergeme.checkpoint import hash_checkpoint, hash_weight_files
from mergeme.data import dvc_output_md5s
from tests.conftest import write_pipeline_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(prefect_harness, tiny_family, dvc_project, tmp_path_factory):
    from flows.pipeline import merge_pipeline

    folder = tmp_path_factory.mktemp("flow")
    config_path = write_pipeline_config(folder, tiny_family, dvc_project)
    result = merge_pipeline(str(config_path), str(folder / "workspace"))
    return folder, config_path, result


def test_every_step_reports_and_the_moe_is_registered(pipeline_run, tiny_family):
    _, _, result = pipeline_run
    assert [item["name"] for item in result["fetched"]] == ["base", "math", "code", "knowledge"]
    assert result["validation"]["success"] is True
    assert result["merge"]["architecture"] == "mixtral"
    assert result["calibration"]["method"] == "centroid"
    models = {row["model"] for row in result["evaluation"]["rows"]}
    assert models == {"moe", "base", "math", "code", "knowledge"}
    assert result["release"]["model_name"] == "tiny-moe"
    assert result["release"]["alias"] == "candidate"


def test_release_carries_the_lineage(pipeline_run, tiny_family, dvc_project):
    import mlflow
    from mlflow import MlflowClient

    _, _, result = pipeline_run
    client = MlflowClient()
    version = client.get_model_version_by_alias("tiny-moe", "candidate")
    assert str(version.version) == result["release"]["version"]
    tags = version.tags

    for domain, path in tiny_family.experts.items():
        assert tags[f"mergeme.expert.{domain}.content_hash"] == hash_checkpoint(path)
        assert tags[f"mergeme.expert.{domain}.weights_hash"] == hash_weight_files(path)
        assert tags[f"mergeme.expert.{domain}.source"] == f"local:{path}"
    assert tags["mergeme.base.base.content_hash"] == hash_checkpoint(tiny_family.base)
    assert json.loads(tags["mergeme.data_md5"]) == dvc_output_md5s(dvc_project / "dvc.lock", "data")
    assert tags["mergeme.trunk_method"] == "average"
    assert tags["mergeme.router_method"] == "centroid"
    # the commit of the checkout that holds the mergeme package, whatever folder the config is in
    checkout = Path(mergeme.__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tags["mergeme.code_revision"].removesuffix("+dirty") == head
    assert tags["mergeme.package_version"] == mergeme.__version__
    assert len(tags["mergeme.prefect_flow_run_id"]) == 36  # a Prefect flow run UUID

    run = mlflow.get_run(version.run_id)
    assert run.data.params["merge.trunk_method"] == "average"
    assert "eval_loss.moe.math" in run.data.metrics
    artifacts = {item.path for item in client.list_artifacts(version.run_id)}
    assert {"pipeline.yaml", "eval_table.csv", "tensor_stats.csv", "data_docs"} <= artifacts
    # both GX reports are viewable as HTML among the run's artifacts
    assert {"gx_data.json", "data_docs_data"} <= artifacts
    for site in ("data_docs", "data_docs_data"):
        assert f"{site}/index.html" in {i.path for i in client.list_artifacts(version.run_id, site)}


def test_candidate_loads_back_from_the_registry(pipeline_run):
    import mlflow

    folder, _, _ = pipeline_run
    (folder / "dl").mkdir()
    model = mlflow.pyfunc.load_model("models:/tiny-moe@candidate", dst_path=str(folder / "dl"))
    [text] = model.predict({"prompt": ["Ann has 3 apples"]}, params={"max_new_tokens": 4})
    assert isinstance(text, str)


def test_validation_failure_stops_the_flow_before_the_merge(
    prefect_harness, tiny_family, dvc_project, tmp_path
):
    from flows.pipeline import merge_pipeline
    from mergeme.validation.checkpoints import ValidationFailed

    config_path = write_pipeline_config(tmp_path, tiny_family, dvc_project)
    config = yaml.safe_load(config_path.read_text())
    config["experts"][1]["source"]["path"] = str(tmp_path / "broken")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not a checkpoint")
    config_path.write_text(yaml.safe_dump(config))

    with pytest.raises(ValidationFailed, match="'code': .*config.json is missing"):
        merge_pipeline(str(config_path), str(tmp_path / "workspace"))
    assert not (tmp_path / "workspace" / "merges").exists()
