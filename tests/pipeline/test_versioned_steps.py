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
    """A config over copies of the data and of one expert, so the test can change them."""
    folder = tmp_path_factory.mktemp("versioned")
    shutil.copytree(dvc_project / "data" / "demo", folder / "data")
    shutil.copytree(tiny_family.experts["code"], folder / "code-expert")
    config_path = write_pipeline_config(folder, tiny_family, dvc_project)
    config = yaml.safe_load(config_path.read_text())
    config["data"]["root"] = str(folder / "data")
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


def test_new_calibration_data_reruns_calibrate_evaluate_register_only(project):
    folder, config_path, first, _ = project
    calibration = folder / "data" / "math" / "calibration.jsonl"
    lines = calibration.read_text().splitlines()
    calibration.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same texts, new order

    again, states = run_pipeline(config_path, folder / "workspace")
    assert ran(states) == ["fetch experts", "route-calibrate", "evaluate"]
    assert states["merge"] == states["validate checkpoints"] == "Cached"
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
