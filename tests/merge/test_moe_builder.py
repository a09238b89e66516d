"""The Mixtral output: parity with the dense model, a hand-routed reference, clean loading."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergeme.checkpoint import Checkpoint
from mergeme.config import MergeConfig
from mergeme.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from mergeme.merge.moe_builder import build_moe
from tests.factories import perturbed, random_llama, tiny_llama_config
from tests.merge.moe_reference import reference_logits, written_routers

MIXTRAL_ROUTER = "model.layers.{layer}.block_sparse_moe.gate.weight"


def _save(model, folder):
    model.save_pretrained(folder)
    return Checkpoint(folder)


def _load(folder):
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def test_identical_experts_reproduce_the_dense_model(tmp_path):
    dense = random_llama(tiny_llama_config(), seed=1)
    checkpoint = _save(dense, tmp_path / "dense")
    copies = [Checkpoint(tmp_path / "dense", name=f"copy{i}") for i in range(3)]

    build_moe(checkpoint, copies, tmp_path / "moe", MergeConfig(trunk_method="average"))
    moe, info = _load(tmp_path / "moe")

    assert type(moe).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_distinct_experts_match_a_hand_routed_reference(tmp_path):
    base_model = random_llama(tiny_llama_config(), seed=2)
    experts = [perturbed(base_model, seed=20 + i, scale=0.2) for i in range(3)]
    base = _save(base_model, tmp_path / "base")
    checkpoints = [_save(m, tmp_path / f"e{i}") for i, m in enumerate(experts)]

    build_moe(base, checkpoints, tmp_path / "moe", MergeConfig(trunk_method="average", seed=5))
    moe, _ = _load(tmp_path / "moe")

    # the reference has its own averaged trunk; only the random routers come from the output
    routers = written_routers(tmp_path / "moe", MIXTRAL_ROUTER, num_layers=2)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_logits(experts, routers, ids, top_k=2)
        torch.testing.assert_close(moe(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_output_is_sharded_with_an_index_and_the_config_carries_over(tmp_path):
    dense = random_llama(tiny_llama_config(tie_word_embeddings=True), seed=3)
    checkpoint = _save(dense, tmp_path / "dense")
    settings = MergeConfig(max_shard_size=20_000, experts_per_token=1, output_dtype="bfloat16")

    build_moe(checkpoint, [checkpoint, checkpoint], tmp_path / "moe", settings)

    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 1
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"] == dense.config.rope_parameters
    moe, info = _load(tmp_path / "moe")
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_failed_merge_leaves_no_output_folder(tmp_path, monkeypatch):
    dense = random_llama(tiny_llama_config(), seed=4)
    checkpoint = _save(dense, tmp_path / "dense")

    calls = {"count": 0}
    original = Checkpoint.read_range

    def failing_read(self, *args):
        calls["count"] += 1
        if calls["count"] == 5:
            raise KeyboardInterrupt  # a Ctrl-C in the middle of the merge
        return original(self, *args)

    monkeypatch.setattr(Checkpoint, "read_range", failing_read)
    with pytest.raises(KeyboardInterrupt):
        build_moe(checkpoint, [checkpoint, checkpoint], tmp_path / "moe", MergeConfig())
    assert list(tmp_path.iterdir()) == [tmp_path / "dense"]


def test_an_expert_with_other_shapes_is_refused_naming_the_tensor(tmp_path):
    base = _save(random_llama(tiny_llama_config(), seed=5), tmp_path / "base")
    wide = _save(random_llama(tiny_llama_config(intermediate_size=48), seed=6), tmp_path / "wide")

    with pytest.raises(CheckpointError, match=r"'wide'.*mlp\.(down|gate|up)_proj"):
        build_moe(base, [base, wide], tmp_path / "moe", MergeConfig())
    assert not (tmp_path / "moe").exists()


def test_expert_weights_of_the_wrong_length_are_refused_before_any_output(tmp_path):
    base = _save(random_llama(tiny_llama_config(), seed=8), tmp_path / "base")
    settings = MergeConfig(trunk_method="ties", expert_weights=[1.0, 2.0, 3.0])

    with pytest.raises(ConfigError, match=r"merge\.expert_weights has 3 weights for 2 experts"):
        build_moe(base, [base, base], tmp_path / "moe", settings)
    assert list(tmp_path.iterdir()) == [tmp_path / "base"]


def test_an_unsupported_architecture_is_refused_listing_the_supported(tmp_path):
    base = _save(random_llama(tiny_llama_config(attention_bias=True), seed=7), tmp_path / "b")

    with pytest.raises(UnsupportedArchitectureError, match="attention_bias.*Supported: llama"):
        build_moe(base, [base, base], tmp_path / "moe", MergeConfig())
