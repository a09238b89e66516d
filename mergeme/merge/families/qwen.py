"""Qwen2 experts → ``Qwen2MoeForCausalLM``; Qwen3 experts → ``Qwen3MoeForCausalLM``.

Both write the per-expert layout ``mlp.experts.{i}.{gate,up,down}_proj`` and the router
``mlp.gate``. Every layer is sparse (``decoder_sparse_step`` 1, no ``mlp_only_layers``), each
routed expert has the dense FFN's width (``moe_intermediate_size`` = dense
``intermediate_size``) and the top-k weights are renormalised (``norm_topk_prob`` true, as in
Mixtral), so that an MoE of identical copies computes exactly the dense model.

Qwen2-MoE also has a shared expert that every token passes through, scaled by
``sigmoid(shared_expert_gate · x)``. ``merge.shared_expert`` chooses it:

- ``zero``: a shared expert of width 1 with all weights zero, so it adds exactly nothing and
  the MoE of identical copies equals the dense model. (All-zero weights also get zero
  gradients, so it stays zero under training; choose ``base_ffn`` to train one.)
- ``base_ffn``: the base model's FFN at full width, with a zero gate row, so every token gets
  ``0.5 ×`` the base FFN on top of the routed experts until calibration or training moves the
  gate.
"""

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

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ZERO_SHARED_WIDTH = 1


def _moe_fields(dense_config: dict, num_experts: int, settings: MergeConfig) -> dict:
    """The MoE fields both Qwen families set the same way (see the module docstring)."""
    return {
        "intermediate_size": dense_config["intermediate_size"],
        "moe_intermediate_size": dense_config["intermediate_size"],
        "num_experts": num_experts,
        "num_experts_per_tok": settings.experts_per_token,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
        "output_router_logits": False,
    }


def _expert_name(dense_name: str, expert: int) -> str:
    layer, projection = dense_ffn_parts(dense_name)
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


@dataclass(frozen=True)
class Qwen2MoeArchitecture:
    """Qwen2-MoE: routed experts plus a gated shared expert (``merge.shared_expert``)."""

    name: str = "qwen2_moe"
    dense_model_types: tuple[str, ...] = ("qwen2",)
    reference: str = "Qwen Team 2024, Qwen1.5-MoE / Qwen2 Technical Report, arXiv 2407.10671"

    def unsupported_reason(self, dense_config: dict) -> str | None:
        if dense_config.get("model_type") not in self.dense_model_types:
            return f"model_type {dense_config.get('model_type')!r} is not qwen2"
        return common_unsupported_reason(dense_config)

    def moe_config(self, dense_config: dict, num_experts: int, settings: MergeConfig) -> dict:
        # Qwen2-MoE derives its sliding layers differently from Qwen2: pass them explicitly
        layer_types = dense_config["layer_types"]
        sliding = "sliding_attention" in layer_types
        shared_width = (
            dense_config["intermediate_size"]
            if settings.shared_expert == "base_ffn"
            else ZERO_SHARED_WIDTH
        )
        return {
            **carry(dense_config, COMMON_KEYS),
            **_moe_fields(dense_config, num_experts, settings),
            "model_type": self.name,
            "architectures": ["Qwen2MoeForCausalLM"],
            "layer_types": layer_types,
            "use_sliding_window": sliding,
            "sliding_window": dense_config["sliding_window"] if sliding else None,
            "shared_expert_intermediate_size": shared_width,
            "qkv_bias": True,  # Qwen2 always has q/k/v biases (no o bias)
        }

    def expert_tensor_name(self, dense_name: str, expert: int) -> str:
        return _expert_name(dense_name, expert)

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def extra_tensors(self, dense_config: dict, settings: MergeConfig) -> list[ExtraTensor]:
        hidden, width = dense_config["hidden_size"], dense_config["intermediate_size"]
        extras = []
        for layer in range(dense_config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}.mlp"
            for projection in PROJECTIONS:
                name = f"{prefix}.shared_expert.{projection}.weight"
                if settings.shared_expert == "base_ffn":
                    shape = (hidden, width) if projection == "down_proj" else (width, hidden)
                    extras.append(ExtraTensor(name, shape, f"{prefix}.{projection}.weight"))
                else:
                    shape = (
                        (hidden, ZERO_SHARED_WIDTH)
                        if projection == "down_proj"
                        else (ZERO_SHARED_WIDTH, hidden)
                    )
                    extras.append(ExtraTensor(name, shape, None))
            # (1, hidden) zeros: sigmoid(0) = 0.5 for base_ffn; irrelevant for zero
            extras.append(ExtraTensor(f"{prefix}.shared_expert_gate.weight", (1, hidden), None))
        return extras


@dataclass(frozen=True)
class Qwen3MoeArchitecture:
    """Qwen3-MoE: routed experts only; attention with per-head q/k RMS norms."""

    name: str = "qwen3_moe"
    dense_model_types: tuple[str, ...] = ("qwen3",)
    reference: str = "Qwen Team 2025, Qwen3 Technical Report, arXiv 2505.09388"

    def unsupported_reason(self, dense_config: dict) -> str | None:
        if dense_config.get("model_type") not in self.dense_model_types:
            return f"model_type {dense_config.get('model_type')!r} is not qwen3"
        layer_types = set(dense_config["layer_types"])
        if len(layer_types) > 1:
            return (
                "sliding-window attention on only some layers (layer_types mixes "
                f"{sorted(layer_types)}); Qwen3-MoE applies one window to every layer or none"
            )
        return common_unsupported_reason(dense_config)

    def moe_config(self, dense_config: dict, num_experts: int, settings: MergeConfig) -> dict:
        # Qwen3-MoE windows every layer or none; unsupported_reason refused a mix
        sliding = dense_config["layer_types"][0] == "sliding_attention"
        return {
            **carry(dense_config, (*COMMON_KEYS, "attention_bias")),
            **_moe_fields(dense_config, num_experts, settings),
            "model_type": self.name,
            "architectures": ["Qwen3MoeForCausalLM"],
            "use_sliding_window": sliding,
            "sliding_window": dense_config["sliding_window"] if sliding else None,
        }

    def expert_tensor_name(self, dense_name: str, expert: int) -> str:
        return _expert_name(dense_name, expert)

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def extra_tensors(self, dense_config: dict, settings: MergeConfig) -> list[ExtraTensor]:
        return []
