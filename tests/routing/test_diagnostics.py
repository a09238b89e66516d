"""Routing diagnostics on hand-made counts: shares, balance, idle experts and the files."""

from __future__ import annotations

import math

import pytest
import torch

from mergeme.routing.diagnostics import (
    balance_by_layer,
    shares_from_counts,
    write_routing_diagnostics,
)

COUNTS = {
    "math": torch.tensor([[6.0, 2.0, 0.0], [4.0, 4.0, 0.0]]),  # (layers, experts)
    "code": torch.tensor([[2.0, 6.0, 0.0], [0.0, 4.0, 4.0]]),
}


def test_shares_and_balance_by_hand():
    shares = shares_from_counts(COUNTS)
    assert shares["math"] == pytest.approx([10 / 16, 6 / 16, 0.0])
    assert shares["code"] == pytest.approx([2 / 16, 10 / 16, 4 / 16])

    layer_0, layer_1 = balance_by_layer(COUNTS)
    # layer 0 over both domains: 8, 8, 0 slots → entropy log 2, expert 2 idle
    assert layer_0["entropy"] == pytest.approx(math.log(2))
    assert layer_0["normalised_entropy"] == pytest.approx(math.log(2) / math.log(3))
    assert layer_0["idle_experts"] == "2"
    # layer 1: 4, 8, 4 slots
    expected = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert layer_1["entropy"] == pytest.approx(expected) and layer_1["idle_experts"] == ""


def test_files_and_metrics(tmp_path):
    calibration = {"condition_numbers": [3.0, 40.0], "max_cosine_between_rows": [0.1, 0.9]}
    files, metrics = write_routing_diagnostics(COUNTS, ["m", "c", "k"], tmp_path, calibration)

    names = [path.split("/")[-1] for path in files]
    assert names == [
        "routing_shares_by_domain.csv",
        "routing_heatmap.png",
        "routing_balance.csv",
        "router_condition.csv",
    ]
    assert (tmp_path / "routing_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["routing_idle_experts.layer_0"] == 1.0
    assert metrics["router_condition.layer_1"] == 40.0
    assert "m,c,k" in (tmp_path / "routing_shares_by_domain.csv").read_text()
