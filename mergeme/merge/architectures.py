"""MoE output families: how a dense expert's tensors map into a transformers MoE checkpoint.

Each family says which dense architectures it accepts (and why not, when it refuses), builds
the MoE ``config.json`` from the dense one, and names every tensor of the MoE checkpoint.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Protocol

from mergeme.errors import UnsupportedArchitectureError

logger = logging.getLogger(__name__)

DENSE_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


class MoEArchitecture(Protocol):
    name: str
    dense_model_types: tuple[str, ...]

    def unsupported_reason(self, dense_config: dict) -> str | None: ...

    def moe_config(self, dense_config: dict, num_experts: int, experts_per_token: int) -> dict: ...

    def expert_tensor_name(self, dense_name: str, expert: int) -> str: ...

    def router_name(self, layer: int) -> str: ...


@dataclass(frozen=True)
class MixtralArchitecture:
    """Llama or Mistral experts → ``MixtralForCausalLM`` (classic per-expert tensor layout)."""

    name: str = "mixtral"
    dense_model_types: tuple[str, ...] = ("llama", "mistral")
    reference: str = "Jiang et al. 2024, Mixtral of Experts, arXiv 2401.04088"
    # gate_proj, up_proj, down_proj are Mixtral's w1, w3, w2
    ffn_names: tuple[tuple[str, str], ...] = (
        ("gate_proj", "w1"),
        ("up_proj", "w3"),
        ("down_proj", "w2"),
    )

    def unsupported_reason(self, dense_config: dict) -> str | None:
        if dense_config.get("model_type") not in self.dense_model_types:
            return f"model_type {dense_config.get('model_type')!r} is not llama or mistral"
        if dense_config.get("attention_bias"):
            return "attention_bias is true, and Mixtral attention has no bias"
        if dense_config.get("mlp_bias"):
            return "mlp_bias is true, and Mixtral experts have no bias"
        if dense_config.get("hidden_act", "silu") != "silu":
            return f"hidden_act {dense_config.get('hidden_act')!r}; Mixtral experts use silu"
        return None

    def moe_config(self, dense_config: dict, num_experts: int, experts_per_token: int) -> dict:
        from transformers import MixtralConfig

        carried = {
            key: dense_config[key]
            for key in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
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
                "sliding_window",
                "attention_dropout",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
                "dtype",
            )
            if key in dense_config
        }
        config = MixtralConfig(
            **carried,
            num_local_experts=num_experts,
            num_experts_per_tok=experts_per_token,
            router_aux_loss_coef=0.01,
            output_router_logits=False,
            architectures=["MixtralForCausalLM"],
        )
        return config.to_dict()

    def expert_tensor_name(self, dense_name: str, expert: int) -> str:
        match = DENSE_FFN.match(dense_name)
        if match is None:
            raise ValueError(f"{dense_name!r} is not a dense FFN weight")
        layer, projection = match.groups()
        moe_projection = dict(self.ffn_names)[projection]
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{moe_projection}.weight"

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"


ARCHITECTURES: dict[str, MoEArchitecture] = {"mixtral": MixtralArchitecture()}


def architecture_for(dense_config: dict) -> MoEArchitecture:
    """The MoE family that serves experts of this dense config.

    Raises:
        UnsupportedArchitectureError: no family accepts it; the message lists what is supported.
    """
    model_type = dense_config.get("model_type")
    reasons = []
    for architecture in ARCHITECTURES.values():
        reason = architecture.unsupported_reason(dense_config)
        if reason is None:
            return architecture
        if model_type in architecture.dense_model_types:
            reasons.append(f"{architecture.name}: {reason}")
    supported = ", ".join(
        f"{'/'.join(a.dense_model_types)} → {a.name}" for a in ARCHITECTURES.values()
    )
    detail = "; ".join(reasons) or f"model_type {model_type!r} has no MoE family"
    raise UnsupportedArchitectureError(
        f"cannot build an MoE from these experts ({detail}). Supported: {supported}"
    )


def is_dense_ffn(name: str) -> bool:
    return DENSE_FFN.match(name) is not None


def architecture_for_moe(moe_config: dict) -> MoEArchitecture:
    """The family of an MoE checkpoint that mergeme wrote.

    Raises:
        UnsupportedArchitectureError: the checkpoint is not of a family mergeme writes.
    """
    for architecture in ARCHITECTURES.values():
        if moe_config.get("model_type") == architecture.name:
            return architecture
    raise UnsupportedArchitectureError(
        f"model_type {moe_config.get('model_type')!r} is not an MoE family mergeme writes "
        f"({', '.join(ARCHITECTURES)})"
    )
