"""The routing benchmark's scoring (only the tokens after the routing prefix) and a short
end-to-end run of the script on the tiny family."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "routing_quality.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("routing_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_the_scored_mask_skips_each_rows_first_real_tokens(benchmark):
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])  # right and left padding
    expected = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    assert torch.equal(benchmark.scored_mask(mask, 2), expected)


def test_losses_are_scored_on_the_tokens_after_the_prefix_only(benchmark, tiny_family):
    path = tiny_family.experts["math"]
    lines = (tiny_family.data / "math" / "eval.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines[:4]]
    args = argparse.Namespace(max_length=32, prefix_tokens=5)

    measured = benchmark.measure(path, {"math": texts}, args)

    # independently: one text at a time, the NLL of every token from the sixth on
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        for position in range(5, ids.shape[1]):
            total -= float(log_probs[position - 1, ids[0, position]])
            count += 1
    assert measured.tokens["math"] == count
    assert measured.losses["math"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_a_short_run_prints_the_whole_table(tiny_family, tmp_path):
    command = [sys.executable, str(SCRIPT), "--data", str(tiny_family.data)]
    command += ["--experts", str(tiny_family.root), "--trunks", "average"]
    command += ["--routers", "random,finetune", "--finetune-steps", "2", "--eval-texts", "3"]
    command += ["--calibration-texts", "3", "--max-length", "32", "--prefix-tokens", "4"]
    command += ["--threads", "1", "--diagnostics", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")]
    routers = [row[1] for row in rows[1:]]
    assert routers == [
        "base (dense)",
        "oracle",
        "random",
        "finetune",
        "ppl_sequence layer",
        "ppl_sequence path",
        "ppl_sequence layer, top-1",
        "ppl_sequence layer, T 0.05",
    ]
    assert "scored after their first 4 tokens" in result.stdout
    assert (tmp_path / "average-finetune" / "diagnostics" / "router_condition.csv").is_file()
    assert (tmp_path / "ppl_sequence_path" / "diagnostics" / "routing_heatmap.png").is_file()
