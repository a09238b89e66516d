"""Router methods through the pipeline's steps: config → calibrate → evaluate → register,
with the diagnostics and loss curves landing in a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig

from mergeme.config import load_config
from mergeme.pipeline import (
    calibrate_step,
    evaluate_step,
    fetch_step,
    merge_step,
    register_step,
)
from mergeme.registry.store import connect
from tests.conftest import write_pipeline_config

NO_VALIDATION = {"stats_csv": None, "gx_result_json": None, "docs_index": None}


def _steps(tiny_family, dvc_project, folder: Path, router: dict):
    config_path = write_pipeline_config(
        folder, tiny_family, dvc_project, router={"max_texts_per_domain": 4, **router}
    )
    config = load_config(config_path)
    workspace = folder / "workspace"
    connect(config.registry.tracking_uri, workspace)
    fetched = fetch_step(config, workspace)
    merged = merge_step(config, fetched, workspace)
    calibrated = calibrate_step(config, merged, workspace, fetched)
    evaluation = evaluate_step(config, calibrated, fetched, folder / "eval", workspace)
    return config_path, config, workspace, fetched, merged, calibrated, evaluation


def test_ppl_sequence_produces_a_model_that_evaluates_by_sequence(
    tiny_family, dvc_project, tmp_path
):
    router = {"method": "ppl_sequence", "sequence": {"top_k": 2, "mixing": "path"}}
    *_, calibrated, evaluation = _steps(tiny_family, dvc_project, tmp_path, router)

    config = AutoConfig.from_pretrained(calibrated["output"])
    assert config.model_type == "mergeme_ppl_moe" and config.experts_per_sequence == 2
    assert config.expert_names == ["math", "code", "knowledge"]
    moe_rows = [row for row in evaluation["rows"] if row["model"] == "moe"]
    assert len(moe_rows) == 3 and all(row["loss"] > 0 for row in moe_rows)
    for shares in evaluation["routing_shares"].values():
        assert sum(shares) == pytest.approx(1.0)
        # every sequence takes exactly two of three experts: no share can exceed one half
        assert max(shares) <= 0.5 + 1e-9
    names = {Path(file).name for file in evaluation["files"]}
    assert {"routing_heatmap.png", "routing_balance.csv"} <= names


@pytest.mark.slow
def test_finetune_curves_and_diagnostics_are_logged_to_mlflow(tiny_family, dvc_project, tmp_path):
    from mlflow import MlflowClient

    router = {"method": "finetune", "finetune": {"steps": 4, "batch_size": 2, "split": "train"}}
    config_path, config, workspace, fetched, merged, calibrated, evaluation = _steps(
        tiny_family, dvc_project, tmp_path, router
    )
    release = register_step(
        config, config_path, workspace, fetched, NO_VALIDATION, merged, calibrated, evaluation, None
    )

    client = MlflowClient()
    history = client.get_metric_history(release["run_id"], "finetune.loss")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx(calibrated["loss_curves"]["loss"])
    logged = {item.path for item in client.list_artifacts(release["run_id"])}
    assert {"routing_heatmap.png", "router_condition.csv", "routing_balance.csv"} <= logged
    run = client.get_run(release["run_id"])
    assert "router_condition.layer_0" in run.data.metrics
    assert run.data.params["router.finetune.steps"] == "4"
