"""The MoE output families, re-exported from ``mergeme.merge.families`` (one file per family)."""

from mergeme.merge.families import (
    ARCHITECTURES,
    ExtraTensor,
    MoEArchitecture,
    architecture_for,
    architecture_for_moe,
    is_dense_ffn,
    supported_architectures,
)

__all__ = [
    "ARCHITECTURES",
    "ExtraTensor",
    "MoEArchitecture",
    "architecture_for",
    "architecture_for_moe",
    "is_dense_ffn",
    "supported_architectures",
]
