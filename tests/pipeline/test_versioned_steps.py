"""Versioned steps: which steps a re-run executes, read from the Prefect API's task run states
(Completed: it ran; Cached: its persisted result was reused), and what it registers.

The module works on a DVC project of its own (a copy with its own dvc.lock) and on copies of
the base and one expert, so a test can change the data (and commit it with DVC), a checkpoint
or the code version. Every test may run alone or in any order: each compares the registry
with what it held just before.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file, save_file

from mergeme import versioning
from mergeme.data import dvc_output_md5s
from tests.conftest import write_pipeline_config
from tests.pipeline.runs import STEPS, ran, registered_versions, run_pipeline, run_to_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(prefect_harness, tiny_family, dvc_project, tmp_path_factory):
    """A config over its own DVC project and copies of the base and the code expert."""
    folder = tmp_path_factory.mktemp("versioned")
    shutil.copytree(dvc_project, folder / "project")
    shutil.copytree(tiny_family.base, folder / "base")
    shutil.copytree(tiny_family.experts["code"], folder / "code-expert")
    config_path = write_pipeline_config(folder, tiny_family, folder / "project")
    config = yaml.safe_load(config_path.read_text())
    config["base"]["source"]["path"] = str(folder / "base")
    config["experts"][1]["source"]["path"] = str(folder / "code-expert")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    first, states = run_pipeline(config_path, folder / "workspace")
    return folder, config_path, first, states


def commit_data(project_root) -> None:
    """Record the data as it is now in dvc.lock (``dvc commit``), as a data owner would."""
    command = [sys.executable, "-m", "dvc", "commit", "-f", "-q", "data"]
    subprocess.run(command, cwd=project_root, check=True, capture_output=True)


def rerun(folder, config_path) -> tuple[dict, dict[str, str], list[str]]:
    """Run the pipeline again; returns its result, the step states and the versions newly
    registered by it."""
    before = registered_versions()
    result, states = run_pipeline(config_path, folder / "workspace")
    return result, states, sorted(set(registered_versions()) - set(before))


def datasets(run_id: str) -> dict[str, tuple[str, dict]]:
    """``{context: (digest, tags)}`` of a run's dataset inputs."""
    import mlflow

    found = {}
    for item in mlflow.get_run(run_id).inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in item.tags}
        found[tags["mlflow.data.context"]] = (item.dataset.digest, tags)
    return found


def step_runs(parent_run_id: str) -> dict[str, object]:
    """``{step: run}`` of the nested step runs of a release run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return {run.data.tags["mergeme.step"]: run for run in found}


def test_first_run_executes_every_step(project):
    _, _, first, states = project
    assert ran(states) == STEPS
    assert states["register"] == "Completed" and first["release"]["created"] is True


def test_unchanged_rerun_reuses_every_step_and_registers_nothing(project):
    folder, config_path, _, _ = project
    rerun(folder, config_path)  # brings the cache up to date with whatever ran before
    before = registered_versions()
    again, states, new = rerun(folder, config_path)
    assert ran(states) == ["fetch experts"]  # fetch always checks its sources
    assert {states[s] for s in STEPS[1:]} == {"Cached"}
    assert again["release"]["created"] is False and new == []
    assert again["release"]["version"] in before
    assert again["release"]["alias"] == "candidate"


def test_new_calibration_data_reruns_validate_calibrate_evaluate_register_only(project):
    folder, config_path, _, _ = project
    previous = datasets(rerun(folder, config_path)[0]["release"]["run_id"])
    calibration = folder / "project" / "data" / "demo" / "math" / "calibration.jsonl"
    lines = calibration.read_text().splitlines()
    calibration.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same texts, new order
    commit_data(folder / "project")

    again, states, new = rerun(folder, config_path)
    # validation checks the data too, so it runs again; the merge does not depend on the data
    assert ran(states) == ["fetch experts", "validate checkpoints", "route-calibrate", "evaluate"]
    assert states["merge"] == "Cached"
    assert again["release"]["created"] is True and new == [again["release"]["version"]]

    # the nested step runs say which steps ran in this pipeline run, with their own times
    runs = step_runs(again["release"]["run_id"])
    assert {step: run.data.tags.get("mergeme.reused") for step, run in runs.items()} == {
        "fetch": None,
        "validate": "false",
        "merge": "true",
        "calibrate": "false",
        "evaluate": "false",
    }
    merge_timing = again["merge"]["timing"]
    assert runs["merge"].info.start_time == merge_timing["started_ms"]
    assert runs["merge"].info.end_time == merge_timing["finished_ms"]
    assert runs["merge"].info.end_time < runs["calibrate"].info.start_time
    assert all(run.info.status == "FINISHED" for run in runs.values())

    # the release records the data as committed now, not as it was
    tags = again["release"]["tags"]
    lock = dvc_output_md5s(folder / "project" / "dvc.lock", "data")
    assert json.loads(tags["mergeme.data_md5"]) == lock
    assert json.loads(tags["mergeme.calibration_md5"])["math"] == (
        hashlib.md5(calibration.read_bytes()).hexdigest()
    )
    # one domain's file changed: the calibration digest changes, the eval digest does not
    current = datasets(again["release"]["run_id"])
    assert current["calibration"][0] != previous["calibration"][0]
    assert current["eval"][0] == previous["eval"][0]
    assert all(len(digest) <= 36 for digest, _ in current.values())  # MLflow's column width
    assert {f"dvc_md5.{out}": md5 for out, md5 in lock.items()}.items() <= (
        current["calibration"][1].items()
    )


def test_uncommitted_data_records_the_md5s_actually_used(project, tmp_path):
    folder, config_path, _, _ = project
    config = yaml.safe_load(config_path.read_text())
    config["data"]["allow_uncommitted"] = True
    accepting = tmp_path / "pipeline.yaml"
    accepting.write_text(yaml.safe_dump(config, sort_keys=False))
    lock_file = folder / "project" / "dvc.lock"
    eval_file = folder / "project" / "data" / "demo" / "knowledge" / "eval.jsonl"
    eval_file.write_text("\n".join(eval_file.read_text().splitlines()[::-1]) + "\n")

    again, _, new = rerun(folder, accepting)
    tags = again["release"]["tags"]
    assert new == [again["release"]["version"]] and tags["mergeme.data_uncommitted"] == "true"
    recorded = json.loads(tags["mergeme.data_md5"])
    assert recorded != dvc_output_md5s(lock_file, "data")
    # DVC itself, committing the same files, computes the md5s that were recorded
    commit_data(folder / "project")
    assert recorded == dvc_output_md5s(lock_file, "data")


def test_changed_expert_reruns_from_fetch(project):
    folder, config_path, _, _ = project
    before = rerun(folder, config_path)[0]
    weights = folder / "code-expert" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})

    again, states, new = rerun(folder, config_path)
    assert ran(states) == STEPS
    assert again["fetched"][2]["content_hash"] != before["fetched"][2]["content_hash"]
    assert again["fetched"][2]["weights_hash"] != before["fetched"][2]["weights_hash"]
    tags = again["release"]["tags"]
    assert tags["mergeme.expert.code.content_hash"] == again["fetched"][2]["content_hash"]
    assert new == [again["release"]["version"]]


def test_edited_tokenizer_is_validated_again(project):
    from mergeme.validation.checkpoints import ValidationFailed

    folder, config_path, _, _ = project
    tokenizer = folder / "code-expert" / "tokenizer.json"
    original = tokenizer.read_bytes()
    edited = json.dumps(json.loads(original), indent=1)  # same tokens, other bytes
    tokenizer.write_text(edited)
    try:
        state, states = run_to_state(config_path, folder / "workspace")
    finally:
        tokenizer.write_bytes(original)
    # a cached validation of the old files would have let the changed tokenizer through
    assert states["validate checkpoints"] == "Failed" and "merge" not in states
    with pytest.raises(ValidationFailed, match="'code': tokenizer files differ"):
        state.result()


def test_edited_config_reruns_validate_and_merge(project):
    folder, config_path, _, _ = project
    before = rerun(folder, config_path)[0]
    config_file = folder / "code-expert" / "config.json"
    config = json.loads(config_file.read_text())
    config["max_position_embeddings"] = config.get("max_position_embeddings", 2048) * 2
    config_file.write_text(json.dumps(config, indent=2))

    again, states, new = rerun(folder, config_path)
    assert ran(states) == STEPS
    assert again["merge"]["key"] != before["merge"]["key"]
    code_before, code_now = before["fetched"][2], again["fetched"][2]
    assert code_now["content_hash"] != code_before["content_hash"]
    assert code_now["weights_hash"] == code_before["weights_hash"]
    assert new == [again["release"]["version"]]


def test_changed_merge_code_reruns_merge_and_registers_a_new_release(project, monkeypatch):
    folder, config_path, _, _ = project
    before = rerun(folder, config_path)[0]
    real = versioning.code_version

    # what editing a file under mergeme/merge does to the merge step's code version
    def edited(step: str) -> str:
        return real(step) + ("-edited" if step == "merge" else "")

    monkeypatch.setattr(versioning, "code_version", edited)
    again, states, new = rerun(folder, config_path)
    assert ran(states) == ["fetch experts", "merge", "route-calibrate", "evaluate"]
    assert states["validate checkpoints"] == "Cached"
    assert again["merge"]["key"] != before["merge"]["key"]
    assert (folder / "workspace" / "merges" / again["merge"]["key"]).is_dir()
    assert again["release"]["created"] is True and new == [again["release"]["version"]]
    tags, old_tags = again["release"]["tags"], before["release"]["tags"]
    assert tags["mergeme.code_fingerprint"] != old_tags["mergeme.code_fingerprint"]


def test_release_run_records_steps_data_and_card(project):
    import mlflow

    folder, _, first, _ = project
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

    # each split's digest is an md5 over its domains' file md5s; the DVC md5 is a tag
    inputs = datasets(run_id)
    assert set(inputs) == {"calibration", "eval"}
    tags = first["release"]["tags"]
    for context, md5_tag in (("calibration", "calibration_md5"), ("eval", "eval_md5")):
        files = json.loads(tags[f"mergeme.{md5_tag}"])
        lines = "\n".join(f"{domain} {md5}" for domain, md5 in sorted(files.items()))
        digest, input_tags = inputs[context]
        assert digest == hashlib.md5(lines.encode()).hexdigest()
        assert {k.removeprefix("md5."): v for k, v in input_tags.items() if k[:4] == "md5."} == (
            files
        )
        assert input_tags["git_revision"] and input_tags["dvc_uncommitted"] == "false"
    assert inputs["calibration"][0] != inputs["eval"][0]

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
