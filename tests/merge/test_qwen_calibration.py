"""Route calibration recognises the Qwen MoE families that mergeme writes."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from mergeme.checkpoint import Checkpoint
from mergeme.config import MergeConfig, RouterConfig
from mergeme.merge.moe_builder import build_moe
from mergeme.routing.calibrate import calibrate_routers
from tests.merge.moe_reference import random_dense
from tests.merge.test_qwen_families import qwen2_config, qwen3_config


def test_random_routers_replace_the_qwen_routers_and_keep_everything_else(tmp_path):
    for name, config in (("qwen2", qwen2_config()), ("qwen3", qwen3_config())):
        dense = random_dense(config, seed=8)
        dense.save_pretrained(tmp_path / f"{name}-dense")
        checkpoint = Checkpoint(tmp_path / f"{name}-dense")
        merged, out = tmp_path / f"{name}-moe", tmp_path / f"{name}-calibrated"
        build_moe(checkpoint, [checkpoint] * 2, merged, MergeConfig(shared_expert="base_ffn"))

        calibrate_routers(merged, out, [[], []], RouterConfig(method="random", seed=3))

        before = Checkpoint(merged)
        after = Checkpoint(out)
        gate = "model.layers.1.mlp.gate.weight"
        assert not torch.equal(before.get(gate), after.get(gate))
        for tensor in before.tensor_names():
            if not tensor.endswith("mlp.gate.weight"):
                assert torch.equal(before.get(tensor), after.get(tensor)), tensor
        _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
