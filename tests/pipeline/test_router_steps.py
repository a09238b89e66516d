"""Router methods through the pipeline's steps: config → calibrate → evaluate → register,
with the diagnostics and loss curves landing in a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mergeme.checkpoint import Checkpoint
from mergeme.config import load_config
from mergeme.pipeline import (
    calibrate_step,
    evaluate_step,
    fetch_step,
    merge_step,
    register_step,
)
from mergeme.registry.store import connect
from mergeme.routing.diagnostics import condition_number
from tests.conftest import write_pipeline_config

NO_VALIDATION = {"stats_csv": None, "gx_result_json": None, "docs_index": None}
ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"


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


def _eval_texts(config, domain: str) -> list[str]:
    """The eval texts the evaluate step reads, straight from the JSONL file."""
    path = config.data.root / domain / f"{config.data.eval_split}.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line)["text"] for line in lines[: config.evaluate.max_texts_per_domain]]


def test_ppl_sequence_produces_a_model_that_evaluates_by_sequence(
    tiny_family, dvc_project, tmp_path
):
    router = {"method": "ppl_sequence", "sequence": {"top_k": 2, "mixing": "path"}}
    _, config, *_, calibrated, evaluation = _steps(tiny_family, dvc_project, tmp_path, router)

    model_config = AutoConfig.from_pretrained(calibrated["output"])
    assert model_config.model_type == "mergeme_ppl_moe"
    assert model_config.experts_per_sequence == 2
    assert model_config.expert_names == ["math", "code", "knowledge"]
    moe_rows = [row for row in evaluation["rows"] if row["model"] == "moe"]
    assert len(moe_rows) == 3 and all(row["loss"] > 0 for row in moe_rows)
    names = {Path(file).name for file in evaluation["files"]}
    assert {"routing_heatmap.png", "routing_balance.csv"} <= names

    # independently: each text goes to the two dense experts with the lowest loss on it
    experts = [AutoModelForCausalLM.from_pretrained(p).eval() for p in tiny_family.experts.values()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_family.base)
    for domain, shares in evaluation["routing_shares"].items():
        counts = torch.zeros(3)
        for text in _eval_texts(config, domain):
            ids = tokenizer(text, truncation=True, max_length=config.evaluate.max_length)
            ids = torch.tensor([ids["input_ids"]])
            with torch.no_grad():
                losses = torch.tensor([e(input_ids=ids, labels=ids).loss for e in experts])
            counts[losses.argsort()[:2]] += 1
        assert shares == pytest.approx((counts / counts.sum()).tolist()), domain


@pytest.mark.parametrize("method", ["random", "ppl_probe"])
def test_token_routers_calibrate_and_evaluate_through_the_steps(
    tiny_family, dvc_project, tmp_path, method
):
    router = {"method": method, "seed": 5, "probe": {"steps": 20}}  # the merge used seed 0
    _, config, *_, merged, calibrated, evaluation = _steps(
        tiny_family, dvc_project, tmp_path, router
    )
    assert calibrated["method"] == method
    calibration_texts = 3 * 4  # three domains, max_texts_per_domain 4
    assert sum(calibrated["probe_label_counts"]) == (
        calibration_texts if method == "ppl_probe" else 0
    )

    # the calibrated routers are the ones the report describes, and differ from the merged ones
    with Checkpoint(merged["output"]) as before, Checkpoint(calibrated["output"]) as after:
        for layer, condition in enumerate(calibrated["condition_numbers"]):
            weight = after.get(ROUTER.format(layer))
            assert not torch.equal(weight, before.get(ROUTER.format(layer)))
            assert condition == pytest.approx(condition_number(weight), rel=1e-5)
            if method == "random":  # seeded normal rows of std initializer_range (0.02)
                assert weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert {row["model"] for row in evaluation["rows"]} == {"moe", "base", *tiny_family.experts}
    for shares in evaluation["routing_shares"].values():
        assert sum(shares) == pytest.approx(1.0)
    assert "router_condition.layer_1" in evaluation["metrics"]


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
    times = [m.timestamp for m in history]
    assert times == sorted(set(times))  # one point per moment, in step order
    assert [m.value for m in history] == pytest.approx(calibrated["loss_curves"]["loss"])
    logged = {item.path for item in client.list_artifacts(release["run_id"])}
    assert {"routing_heatmap.png", "router_condition.csv", "routing_balance.csv"} <= logged
    run = client.get_run(release["run_id"])
    assert "router_condition.layer_0" in run.data.metrics
    assert run.data.params["router.finetune.steps"] == "4"
