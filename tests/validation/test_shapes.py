"""The shapes a config implies, checked against transformers' own tiny models of every family."""

from __future__ import annotations

import json

import pytest
import torch

from mergeme.merge.families import ARCHITECTURES
from mergeme.validation.files import inspect_checkpoint
from mergeme.validation.shapes import SHAPE_CHECKED_TYPES, expected_shapes, shape_problems

SIZES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _tiny(family: str, **overrides):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_class, model_class = classes[family]
    torch.manual_seed(0)
    return model_class(config_class(**{**SIZES, **overrides}))


VARIANTS = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("mistral", {"head_dim": 16}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 16}),
    ("qwen3", {"head_dim": 12, "attention_bias": True, "tie_word_embeddings": True}),
]


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=lambda v: str(v))
def test_the_implied_shapes_are_what_transformers_saves(tmp_path, family, overrides):
    model = _tiny(family, **overrides)
    model.save_pretrained(tmp_path)
    inventory = inspect_checkpoint(family, tmp_path)
    assert inventory.problems == []

    # parity: our layout from config.json, and the tensors transformers itself wrote
    saved = {name: entry.shape for name, entry in inventory.tensors.items()}
    assert expected_shapes(inventory.config) == saved
    assert shape_problems(inventory) == []


def test_every_family_the_merge_supports_has_a_layout():
    merged = {t for architecture in ARCHITECTURES.values() for t in architecture.dense_model_types}
    assert set(SHAPE_CHECKED_TYPES) == merged


@pytest.mark.parametrize(
    ("family", "overrides", "change", "tensor"),
    [
        ("qwen3", {"head_dim": 16}, {"head_dim": 8}, "model.layers.0.self_attn.q_norm.weight"),
        ("qwen2", {}, {"num_key_value_heads": 4}, "model.layers.0.self_attn.k_proj.bias"),
        ("qwen2", {"tie_word_embeddings": True}, {"tie_word_embeddings": False}, "lm_head.weight"),
    ],
)
def test_a_config_that_disagrees_with_the_weights_is_named(
    tmp_path, family, overrides, change, tensor
):
    _tiny(family, **overrides).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))

    problems = shape_problems(inspect_checkpoint("edited", tmp_path))
    assert problems and {p.kind for p in problems} == {"shape_config_mismatch"}
    assert any(f"{tensor!r}" in p.message for p in problems)


def test_an_unknown_model_type_is_refused_naming_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4)).save_pretrained(
        tmp_path
    )
    [problem] = shape_problems(inspect_checkpoint("gpt", tmp_path))
    assert problem.kind == "architecture_unsupported"
    assert "model_type 'gpt2' is not a family mergeme can merge" in problem.message
    assert "supported: llama, mistral, qwen2, qwen3" in problem.message
