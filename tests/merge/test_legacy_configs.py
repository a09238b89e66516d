"""Dense experts saved by transformers 4 (legacy ``rope_theta`` / ``rope_scaling``, sliding
windows without ``layer_types``, fields left at their defaults): the MoE must compute exactly
what transformers computes for the dense model read from the same ``config.json``."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mergeme.checkpoint import Checkpoint
from mergeme.config import MergeConfig
from mergeme.merge.families import normalise_dense_config
from mergeme.merge.moe_builder import build_moe
from tests.merge.moe_reference import random_dense

SIZES = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# config.json files as transformers 4 wrote them; every rope differs from the MoE's default
LEGACY_CONFIGS = {
    "llama_llama3_rope": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **SIZES,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "transformers_version": "4.44.0",
    },
    "mistral_window_linear_rope": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        **SIZES,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "sliding_window": 4,
        "rope_theta": 200000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "transformers_version": "4.40.0",
    },
    "qwen2_window_on_layer_1": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        **SIZES,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 1,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.43.0",
    },
    "qwen3_window_everywhere_yarn": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        **SIZES,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 0,  # every layer from 0 on slides
        "rope_theta": 1000000.0,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 128,
        },
        "tie_word_embeddings": True,
        # no head_dim: Qwen3's default is 128, not hidden_size / heads
        "transformers_version": "4.51.0",
    },
}
MOE_CLASSES = {
    "llama": "MixtralForCausalLM",
    "mistral": "MixtralForCausalLM",
    "qwen2": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3MoeForCausalLM",
}


def _write_legacy_checkpoint(folder, raw: dict, seed: int):
    """A random dense model whose config.json is exactly ``raw``; returns transformers' own
    reading of it (the dense reference)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    random_dense(AutoConfig.from_pretrained(folder), seed=seed).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(raw))  # undo save_pretrained's rewrite
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", sorted(LEGACY_CONFIGS))
def test_identical_legacy_experts_reproduce_the_dense_model(tmp_path, case):
    raw = LEGACY_CONFIGS[case]
    dense = _write_legacy_checkpoint(tmp_path / "dense", raw, seed=11)
    copies = [Checkpoint(tmp_path / "dense", name=f"copy{i}") for i in range(4)]

    build_moe(copies[0], copies, tmp_path / "moe", MergeConfig(trunk_method="average"))
    moe, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "moe", dtype=torch.float32, output_loading_info=True
    )

    assert type(moe).__name__ == MOE_CLASSES[raw["model_type"]]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # 24 tokens: past the window of 4 and far enough for the rope settings to matter
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


# configs that leave out fields, to check the defaults against transformers' classes
MINIMAL_CONFIGS = [
    {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3}
    for model_type in MOE_CLASSES
]
MINIMAL_CONFIGS += [
    {**MINIMAL_CONFIGS[1], "sliding_window": None},
    {**MINIMAL_CONFIGS[2], "use_sliding_window": True, "max_window_layers": 1},
    {**MINIMAL_CONFIGS[3], "use_sliding_window": False, "max_window_layers": 0},
    {**MINIMAL_CONFIGS[0], "rope_parameters": {"rope_type": "linear", "factor": 3.0}},
    {**MINIMAL_CONFIGS[0], "max_position_embeddings": 512, "rope_scaling": LLAMA3_ROPE},
]


@pytest.mark.parametrize("raw", [*LEGACY_CONFIGS.values(), *MINIMAL_CONFIGS])
def test_normalised_config_agrees_with_the_transformers_config_class(raw):
    ours = normalise_dense_config(raw)
    theirs = CONFIG_MAPPING[raw["model_type"]].from_dict(dict(raw))

    for key, value in ours.items():
        if key == "head_dim" and not hasattr(theirs, "head_dim"):  # Qwen2 computes it
            assert value == theirs.hidden_size // theirs.num_attention_heads
        elif key == "layer_types" and theirs.sliding_window is None:
            # without a window transformers' "sliding" layers attend fully
            assert value == ["full_attention"] * theirs.num_hidden_layers
        else:
            assert value == getattr(theirs, key), key
    assert "rope_theta" not in ours and "rope_scaling" not in ours
