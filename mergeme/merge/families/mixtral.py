"""Llama or Mistral experts → ``MixtralForCausalLM`` (classic per-expert tensor layout)."""

from __future__ import annotations

from dataclasses import dataclass

from mergeme.config import MergeConfig
from mergeme.merge.families.common import (
    COMMON_KEYS,
    ROUTER_AUX_LOSS_COEF,
    ExtraTensor,
    carry,
    common_unsupported_reason,
    dense_ffn_parts,
)

# gate_proj, up_proj, down_proj are Mixtral's w1, w3, w2
MIXTRAL_FFN_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclass(frozen=True)
class MixtralArchitecture:
    """Mixtral: routed experts only, softmax over all experts then top-k renormalised."""

    name: str = "mixtral"
    dense_model_types: tuple[str, ...] = ("llama", "mistral")
    reference: str = "Jiang et al. 2024, Mixtral of Experts, arXiv 2401.04088"

    def unsupported_reason(self, dense_config: dict) -> str | None:
        if dense_config.get("model_type") not in self.dense_model_types:
            return f"model_type {dense_config.get('model_type')!r} is not llama or mistral"
        if dense_config.get("attention_bias"):
            return "attention_bias is true, and Mixtral attention has no bias"
        return common_unsupported_reason(dense_config)

    def moe_config(self, dense_config: dict, num_experts: int, settings: MergeConfig) -> dict:
        # Llama attends fully; Mistral slides one window over every layer (or none)
        mistral = dense_config["model_type"] == "mistral"
        return {
            **carry(dense_config, (*COMMON_KEYS, "intermediate_size")),
            "model_type": self.name,
            "architectures": ["MixtralForCausalLM"],
            "sliding_window": dense_config.get("sliding_window") if mistral else None,
            "num_local_experts": num_experts,
            "num_experts_per_tok": settings.experts_per_token,
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
            "output_router_logits": False,
        }

    def expert_tensor_name(self, dense_name: str, expert: int) -> str:
        layer, projection = dense_ffn_parts(dense_name)
        moe_projection = MIXTRAL_FFN_NAMES[projection]
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{moe_projection}.weight"

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"

    def extra_tensors(self, dense_config: dict, settings: MergeConfig) -> list[ExtraTensor]:
        return []
