"""MoE output families: how dense experts' tensors map into a transformers MoE checkpoint.

``ARCHITECTURES`` is the registry; ``architecture_for`` picks the family for dense experts and
``architecture_for_moe`` recognises a checkpoint that mergeme wrote.
"""

from __future__ import annotations

from mergeme.errors import UnsupportedArchitectureError
from mergeme.merge.families.common import DENSE_FFN, ExtraTensor, MoEArchitecture
from mergeme.merge.families.dense_config import normalise_dense_config
from mergeme.merge.families.mixtral import MixtralArchitecture
from mergeme.merge.families.qwen import Qwen2MoeArchitecture, Qwen3MoeArchitecture

__all__ = [
    "ARCHITECTURES",
    "ExtraTensor",
    "MoEArchitecture",
    "architecture_for",
    "architecture_for_moe",
    "is_dense_ffn",
    "normalise_dense_config",
    "supported_architectures",
]

ARCHITECTURES: dict[str, MoEArchitecture] = {
    family.name: family
    for family in (MixtralArchitecture(), Qwen2MoeArchitecture(), Qwen3MoeArchitecture())
}


def supported_architectures() -> str:
    """The supported dense → MoE pairs, as one line for error messages."""
    return ", ".join(f"{'/'.join(a.dense_model_types)} → {a.name}" for a in ARCHITECTURES.values())


def architecture_for(dense_config: dict) -> MoEArchitecture:
    """The MoE family that serves experts of this dense config (raw ``config.json`` contents
    or already normalised).

    Raises:
        UnsupportedArchitectureError: no family accepts it; the message lists what is supported.
    """
    dense_config = normalise_dense_config(dense_config)
    model_type = dense_config.get("model_type")
    reasons = []
    for architecture in ARCHITECTURES.values():
        reason = architecture.unsupported_reason(dense_config)
        if reason is None:
            return architecture
        if model_type in architecture.dense_model_types:
            reasons.append(f"{architecture.name}: {reason}")
    detail = "; ".join(reasons) or f"model_type {model_type!r} has no MoE family"
    raise UnsupportedArchitectureError(
        f"cannot build an MoE from these experts ({detail}). Supported: {supported_architectures()}"
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
