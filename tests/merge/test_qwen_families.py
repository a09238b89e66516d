"""Qwen2-MoE and Qwen3-MoE outputs: parity with the dense model, a hand-routed reference,
clean loading, carried-over config fields, and refusals."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from mergeme.checkpoint import Checkpoint
from mergeme.config import MergeConfig
from mergeme.errors import UnsupportedArchitectureError
from mergeme.merge.moe_builder import build_moe
from tests.merge.moe_reference import (
    perturbed_copy,
    random_dense,
    reference_logits,
    written_routers,
)

QWEN_ROUTER = "model.layers.{layer}.mlp.gate.weight"

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def qwen2_config(**overrides) -> Qwen2Config:
    # sliding window on layer 1 only, narrower than the test sequences
    settings = {
        **TINY,
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 1,
        "tie_word_embeddings": False,
    }
    return Qwen2Config(**{**settings, **overrides})


def qwen3_config(**overrides) -> Qwen3Config:
    # head_dim differs from hidden / heads; tied embeddings; q/k norms come with qwen3
    settings = {**TINY, "head_dim": 16, "tie_word_embeddings": True}
    return Qwen3Config(**{**settings, **overrides})


FAMILIES = {
    "qwen2_moe": (qwen2_config, "Qwen2MoeForCausalLM"),
    "qwen3_moe": (qwen3_config, "Qwen3MoeForCausalLM"),
}


def _save(model, folder, name=None):
    model.save_pretrained(folder)
    return Checkpoint(folder, name=name)


def _load(folder):
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _ids(seed, length=12):
    return torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identical_experts_reproduce_the_dense_model(tmp_path, family):
    make_config, class_name = FAMILIES[family]
    dense = random_dense(make_config(), seed=1)
    _save(dense, tmp_path / "dense")
    copies = [Checkpoint(tmp_path / "dense", name=f"copy{i}") for i in range(4)]

    settings = MergeConfig(trunk_method="average", experts_per_token=2)
    build_moe(copies[0], copies, tmp_path / "moe", settings)
    moe = _load(tmp_path / "moe")

    assert type(moe).__name__ == class_name
    with torch.no_grad():
        torch.testing.assert_close(moe(_ids(0)).logits, dense(_ids(0)).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "shared_expert"),
    [("qwen2_moe", "zero"), ("qwen2_moe", "base_ffn"), ("qwen3_moe", "zero")],
)
def test_distinct_experts_match_a_hand_routed_reference(tmp_path, family, shared_expert):
    make_config, _ = FAMILIES[family]
    base_model = random_dense(make_config(), seed=2)  # qwen2: a window of 4 on layer 1
    experts = [perturbed_copy(base_model, seed=20 + i) for i in range(4)]
    base = _save(base_model, tmp_path / "base")
    checkpoints = [_save(m, tmp_path / f"e{i}") for i, m in enumerate(experts)]

    settings = MergeConfig(trunk_method="average", seed=5, shared_expert=shared_expert)
    build_moe(base, checkpoints, tmp_path / "moe", settings)
    moe = _load(tmp_path / "moe")
    provenance = json.loads((tmp_path / "moe" / "mergeme_merge.json").read_text())
    assert provenance.get("shared_expert") == (shared_expert if family == "qwen2_moe" else None)

    # the reference has its own averaged trunk; only the random routers come from the output
    routers = written_routers(tmp_path / "moe", QWEN_ROUTER, num_layers=2)
    shared = None
    if shared_expert == "base_ffn":
        shared = [layer.mlp for layer in base_model.model.layers]
    ids = _ids(1, 10)
    with torch.no_grad():
        expected = reference_logits(experts, routers, ids, top_k=2, shared_ffns=shared)
        torch.testing.assert_close(moe(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_qwen2_config_carries_sliding_windows_biases_and_moe_fields(tmp_path):
    dense = random_dense(qwen2_config(), seed=3)
    checkpoint = _save(dense, tmp_path / "dense")
    build_moe(checkpoint, [checkpoint] * 2, tmp_path / "moe", MergeConfig(experts_per_token=1))

    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["layer_types"] == ["full_attention", "sliding_attention"]
    assert config["sliding_window"] == 4 and config["use_sliding_window"] is True
    assert config["qkv_bias"] is True and config["norm_topk_prob"] is True
    assert config["num_experts"] == 2 and config["num_experts_per_tok"] == 1
    assert config["router_aux_loss_coef"] == 0.01
    assert config["moe_intermediate_size"] == 64 and config["shared_expert_intermediate_size"] == 1
    assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == []


def test_qwen3_config_carries_head_dim_tied_embeddings_and_a_full_window(tmp_path):
    dense = random_dense(
        qwen3_config(use_sliding_window=True, sliding_window=4, max_window_layers=0), seed=4
    )
    checkpoint = _save(dense, tmp_path / "dense")
    build_moe(checkpoint, [checkpoint] * 2, tmp_path / "moe", MergeConfig())

    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["head_dim"] == 16 and config["tie_word_embeddings"] is True
    assert config["use_sliding_window"] is True and config["sliding_window"] == 4
    # the Hub's name for the count; transformers 5 maps it to num_local_experts
    assert config["num_experts"] == 2 and config["router_aux_loss_coef"] == 0.01
    assert config["norm_topk_prob"] is True
    moe = _load(tmp_path / "moe")
    assert moe.config.num_local_experts == 2
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():  # sequences longer than the window: the window must match
        torch.testing.assert_close(moe(_ids(2)).logits, dense(_ids(2)).logits, rtol=1e-5, atol=1e-5)


def test_qwen3_with_a_window_on_some_layers_only_is_refused(tmp_path):
    config = qwen3_config(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    checkpoint = _save(random_dense(config, seed=5), tmp_path / "dense")

    with pytest.raises(UnsupportedArchitectureError, match="layer_types mixes.*Supported:"):
        build_moe(checkpoint, [checkpoint] * 2, tmp_path / "moe", MergeConfig())
    assert not (tmp_path / "moe").exists()


def test_an_unknown_model_type_is_refused_listing_every_family(tmp_path):
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    checkpoint = _save(random_dense(config, seed=6), tmp_path / "dense")

    with pytest.raises(UnsupportedArchitectureError) as caught:
        build_moe(checkpoint, [checkpoint] * 2, tmp_path / "moe", MergeConfig())
    message = str(caught.value)
    assert "'gpt_neox' has no MoE family" in message
    for pair in ("llama/mistral → mixtral", "qwen2 → qwen2_moe", "qwen3 → qwen3_moe"):
        assert pair in message


def test_an_expert_count_that_is_not_a_power_of_two_warns(tmp_path, caplog):
    checkpoint = _save(random_dense(qwen3_config(), seed=7), tmp_path / "dense")

    with caplog.at_level(logging.WARNING, logger="mergeme.merge.moe_builder"):
        build_moe(checkpoint, [checkpoint] * 3, tmp_path / "three", MergeConfig())
    assert "3 experts is not a power of two" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergeme.merge.moe_builder"):
        build_moe(checkpoint, [checkpoint] * 4, tmp_path / "four", MergeConfig())
    assert "power of two" not in caplog.text
