"""Versioned steps: which steps a re-run executes, read from the Prefect API's task run states
(Completed: it ran; Cached: its persisted result was reused), and what it registers."""

from __future__ import annotations

import shutil

import pytest
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import write_pipeline_config
from tests.pipeline.runs import STEPS, ran, registered_versions, run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(prefect_harness, tiny_family, dvc_project, tmp_path_factory):
    """A config over copies of the DVC project and of one expert, so the test can change them
    (edited data differs from the copied dvc.lock: the config accepts that)."""
    folder = tmp_path_factory.mktemp("versioned")
    shutil.copytree(dvc_project, folder, dirs_exist_ok=True)
    shutil.copytree(tiny_family.experts["code"], folder / "code-expert")
    config_path = write_pipeline_config(folder, tiny_family, folder)
    config = yaml.safe_load(config_path.read_text())
    config["data"]["allow_uncommitted"] = True
    config["experts"][1]["source"]["path"] = str(folder / "code-expert")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    first, states = run_pipeline(config_path, folder / "workspace")
    return folder, config_path, first, states


def test_first_run_executes_every_step(project):
    _, _, first, states = project
    assert ran(states) == STEPS
    assert states["register"] == "Completed" and first["release"]["created"] is True


def test_unchanged_rerun_reuses_every_step_and_registers_nothing(project):
    folder, config_path, first, _ = project
    again, states = run_pipeline(config_path, folder / "workspace")
    assert ran(states) == ["fetch experts"]  # fetch always checks its sources
    assert {states[s] for s in STEPS[1:]} == {"Cached"}
    assert again["release"]["created"] is False
    assert again["release"]["version"] == first["release"]["version"]
    assert registered_versions() == [first["release"]["version"]]


def test_new_calibration_data_reruns_validate_calibrate_evaluate_register_only(project):
    folder, config_path, first, _ = project
    calibration = folder / "data" / "demo" / "math" / "calibration.jsonl"
    lines = calibration.read_text().splitlines()
    calibration.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same texts, new order

    again, states = run_pipeline(config_path, folder / "workspace")
    # validation checks the data too, so it runs again; the merge does not depend on the data
    assert ran(states) == ["fetch experts", "validate checkpoints", "route-calibrate", "evaluate"]
    assert states["merge"] == "Cached"
    assert again["release"]["created"] is True
    assert again["merge"]["key"] == first["merge"]["key"]
    assert len(registered_versions()) == 2


def test_changed_expert_reruns_from_fetch(project):
    folder, config_path, first, _ = project
    weights = folder / "code-expert" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})

    again, states = run_pipeline(config_path, folder / "workspace")
    assert ran(states) == STEPS
    assert again["fetched"][2]["content_hash"] != first["fetched"][2]["content_hash"]
    assert (
        again["release"]["tags"]["mergeme.expert.code.content_hash"]
        == (again["fetched"][2]["content_hash"])
    )
    assert len(registered_versions()) == 3


def test_release_run_records_steps_data_and_card(project, dvc_project):
    import mlflow
    from mergeme.data import dvc_output_md5s

    _, _, first, _ = project
    run_id = first["release"]["run_id"]
    run = mlflow.get_run(run_id)
    children = mlflow.search_runs(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        output_format="list",
    )
    assert sorted(child.info.run_name for child in children) == sorted(
        ["fetch", "validate", "merge", "calibrate", "evaluate"]
    )
    merge_run = next(child for child in children if child.info.run_name == "merge")
    assert merge_run.data.params["merge.trunk_method"] == "average"

    dvc_md5 = ",".join(dvc_output_md5s(dvc_project / "dvc.lock", "data").values())
    inputs = {}
    for item in run.inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in item.tags}
        inputs[tags["mlflow.data.context"]] = (item.dataset.digest, tags)
    assert set(inputs) == {"calibration", "eval"}
    digest, tags = inputs["calibration"]
    assert digest == dvc_md5
    assert tags["dvc_md5"] == dvc_md5 and tags["git_revision"]

    card = mlflow.artifacts.load_text(f"runs:/{run_id}/model_card.md")
    assert first["release"]["tags"]["mergeme.input_fingerprint"] in card
    assert first["fetched"][1]["content_hash"] in card


def test_promote_flow_moves_the_champion(project):
    from flows.promote import promote_flow
    from mergeme.errors import MergemeError
    from mlflow import MlflowClient

    folder, config_path, first, _ = project
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    version = first["release"]["version"]
    result = promote_flow("tiny-moe", version, reason="first", tracking_uri=uri)
    assert result["passed"] is True
    champion = MlflowClient().get_model_version_by_alias("tiny-moe", "champion")
    assert str(champion.version) == version
    again = promote_flow("tiny-moe", version, tracking_uri=uri)
    assert again["passed"] and "already the champion" in again["checks"][0]["detail"]
    with pytest.raises(MergemeError, match="tiny-moe version 99 is not in the registry"):
        promote_flow("tiny-moe", "99", tracking_uri=uri)
