"""What every MoE output family shares: the dense FFN naming, the family protocol, and the
tensors a family adds beyond the routed experts and routers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mergeme.merge.families.dense_config import LAYER_TYPES

if TYPE_CHECKING:
    from mergeme.config import MergeConfig

DENSE_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")

# the router's auxiliary load-balancing loss coefficient written into every MoE config
ROUTER_AUX_LOSS_COEF = 0.01


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor of the MoE that is neither trunk, routed expert nor router (e.g. a shared
    expert): copied from the base model's ``copy_from`` tensor, or zeros when that is None."""

    name: str
    shape: tuple[int, ...]
    copy_from: str | None


class MoEArchitecture(Protocol):
    """One MoE output family: which dense experts it serves and how it names their tensors."""

    name: str
    reference: str
    dense_model_types: tuple[str, ...]

    def unsupported_reason(self, dense_config: dict) -> str | None:
        """Why these dense experts cannot become this family, or None if they can."""
        ...

    def moe_config(self, dense_config: dict, num_experts: int, settings: MergeConfig) -> dict:
        """The MoE ``config.json`` contents, built from the normalised dense config without
        transformers' config classes (importing them costs about a second)."""
        ...

    def expert_tensor_name(self, dense_name: str, expert: int) -> str:
        """The MoE name of dense FFN tensor ``dense_name`` as routed expert ``expert``."""
        ...

    def router_name(self, layer: int) -> str: ...

    def extra_tensors(self, dense_config: dict, settings: MergeConfig) -> list[ExtraTensor]:
        """Tensors the family needs besides the trunk, the routed experts and the routers."""
        ...


def dense_ffn_parts(dense_name: str) -> tuple[str, str]:
    """``(layer, projection)`` of a dense FFN weight name.

    Raises:
        ValueError: ``dense_name`` is not a dense FFN weight.
    """
    match = DENSE_FFN.match(dense_name)
    if match is None:
        raise ValueError(f"{dense_name!r} is not a dense FFN weight")
    layer, projection = match.groups()
    return layer, projection


def carry(dense_config: dict, keys: tuple[str, ...]) -> dict:
    """The entries of ``dense_config`` named in ``keys`` that it has."""
    return {key: dense_config[key] for key in keys if key in dense_config}


# config keys every family copies from the (normalised) dense config
COMMON_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def common_unsupported_reason(dense_config: dict) -> str | None:
    """Refusals shared by every family: FFN biases, activations other than silu, and rope
    settings that differ per layer type. ``dense_config`` is normalised
    (``normalise_dense_config``)."""
    rope = dense_config.get("rope_parameters") or {}
    if any(key in LAYER_TYPES for key in rope):
        return "rope_parameters differ per layer type, and the MoE families use one rope"
    if dense_config.get("mlp_bias"):
        return "mlp_bias is true, and the MoE experts have no bias"
    if dense_config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {dense_config.get('hidden_act')!r}; the MoE experts use silu"
    return None
