"""Each Prefect task's function on its own, on the tiny family, without a Prefect run."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from mergeme.config import load_config
from mergeme.registry.store import connect
from tasks.calibrate import calibrate_routes
from tasks.evaluate import evaluate_models
from tasks.fetch import fetch_experts
from tasks.merge import merge_experts
from tasks.register import register_moe
from tasks.validate import validate_checkpoints
from tests.conftest import write_pipeline_config


@pytest.fixture(scope="module")
def steps(tiny_family, dvc_project, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    config_path = write_pipeline_config(folder, tiny_family, dvc_project)
    config = load_config(config_path)
    workspace = folder / "workspace"
    connect(config.registry.tracking_uri, workspace)
    return folder, config_path, config, workspace


def test_fetch_validate_merge_calibrate_evaluate_register(steps, tiny_family):
    folder, config_path, config, workspace = steps

    fetched = fetch_experts.fn(config, workspace)
    assert [f["role"] for f in fetched] == ["base", "expert", "expert", "expert"]
    assert all(len(f["content_hash"]) == 64 for f in fetched)

    validation = validate_checkpoints.fn(fetched, folder / "report")
    assert validation["success"] and Path(validation["stats_csv"]).is_file()
    assert Path(validation["docs_index"]).is_file()

    merged = merge_experts.fn(config, fetched, workspace)
    assert Path(merged["output"]).parent == workspace / "merges"
    again = merge_experts.fn(config, fetched, workspace)  # same inputs: reused, not rebuilt
    assert again["key"] == merged["key"]

    calibrated = calibrate_routes.fn(config, merged, workspace)
    model = AutoModelForCausalLM.from_pretrained(calibrated["output"])
    assert model.config.num_local_experts == 3

    evaluation = evaluate_models.fn(config, calibrated, fetched, folder / "eval", workspace)
    assert len(evaluation["rows"]) == 5 * 3  # moe, base, 3 experts × 3 domains
    for shares in evaluation["routing_shares"].values():
        assert sum(shares) == pytest.approx(1.0)

    release = register_moe.fn(
        config, config_path, workspace, fetched, validation, merged, calibrated, evaluation
    )
    assert release["version"] == "1"
    assert release["tags"]["mergeme.prefect_flow_run_id"] == "none"  # not inside a flow run
