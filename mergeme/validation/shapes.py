"""The tensor shapes a dense decoder's ``config.json`` implies, compared with its weight files.

Shapes come from the safetensors headers (metadata only). Every dense family mergeme can merge
is checked: Llama (optional attention and MLP biases), Mistral, Qwen2 (biases on q, k and v)
and Qwen3 (per-head q and k norms, optional attention biases); tied embeddings leave out
``lm_head.weight``. A checkpoint of any other ``model_type`` is refused, naming these.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mergeme.validation.files import CheckpointInventory
from mergeme.validation.problems import Problem

LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class _Sizes:
    hidden: int
    inner: int
    heads: int
    kv_heads: int
    head_dim: int


def _projection_biases(prefix: str, size: _Sizes, names: tuple[str, ...]) -> Shapes:
    # q: [heads × head_dim]; k, v: [kv_heads × head_dim]; o: [hidden]
    widths = {
        "q_proj": size.heads * size.head_dim,
        "k_proj": size.kv_heads * size.head_dim,
        "v_proj": size.kv_heads * size.head_dim,
        "o_proj": size.hidden,
    }
    return {f"{prefix}.self_attn.{name}.bias": (widths[name],) for name in names}


def _llama_extras(config: dict, prefix: str, size: _Sizes) -> Shapes:
    extras = {}
    if config.get("attention_bias"):
        extras |= _projection_biases(prefix, size, ("q_proj", "k_proj", "v_proj", "o_proj"))
    if config.get("mlp_bias"):
        mlp = {"gate_proj": size.inner, "up_proj": size.inner, "down_proj": size.hidden}
        extras |= {f"{prefix}.mlp.{name}.bias": (width,) for name, width in mlp.items()}
    return extras


def _qwen2_extras(config: dict, prefix: str, size: _Sizes) -> Shapes:
    return _projection_biases(prefix, size, ("q_proj", "k_proj", "v_proj"))


def _qwen3_extras(config: dict, prefix: str, size: _Sizes) -> Shapes:
    # RMS norms over each head's vector, before rotary embedding: [head_dim]
    extras = {
        f"{prefix}.self_attn.q_norm.weight": (size.head_dim,),
        f"{prefix}.self_attn.k_norm.weight": (size.head_dim,),
    }
    if config.get("attention_bias"):
        extras |= _projection_biases(prefix, size, ("q_proj", "k_proj", "v_proj", "o_proj"))
    return extras


# model_type -> the per-layer tensors it adds to the shared decoder layout
LAYER_EXTRAS: dict[str, Callable[[dict, str, _Sizes], Shapes]] = {
    "llama": _llama_extras,
    "mistral": lambda config, prefix, size: {},
    "qwen2": _qwen2_extras,
    "qwen3": _qwen3_extras,
}
SHAPE_CHECKED_TYPES = tuple(LAYER_EXTRAS)


def expected_shapes(config: dict) -> Shapes:
    """``{tensor name: shape}`` of every weight a dense decoder with ``config`` has.

    Raises:
        KeyError: a size key (vocab_size, hidden_size, ...) is missing from ``config``, or its
            ``model_type`` is not one of ``SHAPE_CHECKED_TYPES``.
    """
    extras = LAYER_EXTRAS[config["model_type"]]
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    heads = config["num_attention_heads"]
    size = _Sizes(
        hidden=hidden,
        inner=config["intermediate_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
    )

    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    q_width, kv_width = size.heads * size.head_dim, size.kv_heads * size.head_dim
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes |= {
            # q: [heads × head_dim, hidden]; k, v: [kv_heads × head_dim, hidden]
            f"{prefix}.self_attn.q_proj.weight": (q_width, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_width, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_width, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, q_width),
            f"{prefix}.mlp.gate_proj.weight": (size.inner, hidden),
            f"{prefix}.mlp.up_proj.weight": (size.inner, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, size.inner),
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
        }
        shapes |= extras(config, prefix, size)
    return shapes


def unsupported_type_problem(inventory: CheckpointInventory) -> Problem | None:
    """``architecture_unsupported`` when the config's ``model_type`` has no known layout."""
    model_type = (inventory.config or {}).get("model_type")
    if model_type in SHAPE_CHECKED_TYPES:
        return None
    return Problem(
        "architecture_unsupported",
        f"{inventory.name!r}: config.json model_type {model_type!r} is not a family mergeme "
        f"can merge; supported: {', '.join(SHAPE_CHECKED_TYPES)}. Use experts of one of these",
    )


def shape_problems(inventory: CheckpointInventory) -> list[Problem]:
    """Every tensor whose header shape disagrees with ``config.json``, every weight the config
    implies but the files lack, every layer beyond ``num_hidden_layers``, and every tensor the
    config does not imply at all."""
    if inventory.config is None:
        return []  # already reported as config_missing or config_unparseable
    unsupported = unsupported_type_problem(inventory)
    if unsupported is not None:
        return [unsupported]
    config, label = inventory.config, f"{inventory.name!r}"
    if not inventory.tensors:
        return []
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
    return problems + unexpected_tensor_problems(inventory, expected)


def unexpected_tensor_problems(inventory: CheckpointInventory, expected: Shapes) -> list[Problem]:
    """``tensor_unexpected`` for each tensor in the files (within the configured layers) that
    the config implies nowhere: a merge would carry it into the MoE as a trunk tensor, and no
    server would load it. A saved ``lm_head.weight`` beside tied embeddings is allowed."""
    config, label = inventory.config or {}, f"{inventory.name!r}"
    layers = config.get("num_hidden_layers", 0)
    allowed = {"lm_head.weight"} if config.get("tie_word_embeddings", False) else set()
    problems = []
    for tensor, entry in sorted(inventory.tensors.items()):
        index = LAYER_INDEX.match(tensor)
        beyond = index is not None and int(index.group(1)) >= layers  # reported above
        if tensor in expected or tensor in allowed or beyond:
            continue
        problems.append(
            Problem(
                "tensor_unexpected",
                f"{label}: tensor {tensor!r} in {entry.file.name} is not part of a "
                f"{config.get('model_type')} model as config.json describes it; remove it from "
                "the weight files, or fix config.json if the model needs it",
            )
        )
    return problems
