"""The tensor shapes a dense decoder's ``config.json`` implies, compared with its weight files.

Shapes come from the safetensors headers (metadata only). Only families whose layout mergeme
knows are checked (Llama and Mistral); for any other ``model_type`` the architecture check
already refuses the checkpoint.
"""

from __future__ import annotations

import re

from mergeme.validation.files import CheckpointInventory
from mergeme.validation.problems import Problem

SHAPE_CHECKED_TYPES = ("llama", "mistral")
LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of every weight a Llama-layout decoder with ``config`` has.

    Raises:
        KeyError: a size key (vocab_size, hidden_size, ...) is missing from ``config``.
    """
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    inner, layers = config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads

    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        shapes |= {
            # q: [heads × head_dim, hidden]; k, v: [kv_heads × head_dim, hidden]
            f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{prefix}.mlp.gate_proj.weight": (inner, hidden),
            f"{prefix}.mlp.up_proj.weight": (inner, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, inner),
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
        }
    return shapes


def shape_problems(inventory: CheckpointInventory) -> list[Problem]:
    """Every tensor whose header shape disagrees with ``config.json``, every weight the config
    implies but the files lack, and every layer beyond ``num_hidden_layers``."""
    config = inventory.config or {}
    if config.get("model_type") not in SHAPE_CHECKED_TYPES or not inventory.tensors:
        return []
    label = f"{inventory.name!r}"
    try:
        expected = expected_shapes(config)
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        return [
            Problem(
                "shape_config_mismatch",
                f"{label}: config.json lacks or has a bad size key ({exc}); restore the config",
            )
        ]

    problems = []
    for tensor, shape in expected.items():
        entry = inventory.tensors.get(tensor)
        if entry is None:
            problems.append(
                Problem(
                    "shape_config_mismatch",
                    f"{label}: config.json implies tensor {tensor!r} {list(shape)}, but the "
                    "weight files lack it; the config and the weights do not belong together",
                )
            )
        elif entry.shape != shape:
            problems.append(
                Problem(
                    "shape_config_mismatch",
                    f"{label}: tensor {tensor!r} in {entry.file.name} has shape "
                    f"{list(entry.shape)}, but config.json implies {list(shape)}; the config "
                    "and the weights do not belong together",
                )
            )
    layers = config["num_hidden_layers"]
    extra = sorted(
        {int(m.group(1)) for t in inventory.tensors if (m := LAYER_INDEX.match(t))}
        - set(range(layers))
    )
    if extra:
        problems.append(
            Problem(
                "shape_config_mismatch",
                f"{label}: the weight files hold layers {extra}, beyond num_hidden_layers "
                f"{layers} in config.json; fix the config or the weights",
            )
        )
    return problems
