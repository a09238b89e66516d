"""Trunk merge methods: how the non-expert weights of the MoE are built from the experts.

The trunk (embeddings, attention, norms, head) has one copy in the MoE, so each trunk tensor
must be merged from the experts' copies. Every method here is a pure function of one tensor
name's base and expert tensors; ``TRUNK_METHODS`` is the registry and ``merge_trunk_tensor`` the
entry point that validates inputs and casts the result.

A task vector is ``expert - base``. All arithmetic runs in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from mergeme.merge.sparsify import derive_seed, drop_in_place, trim_in_place

logger = logging.getLogger(__name__)

TiesAgreement = Literal["sum", "mean"]

PAPER_DENSITY = 0.8
PAPER_SCALE = 1 / 3


@dataclass(frozen=True)
class TrunkMergeOptions:
    """The parameters a trunk merge function may read; each method uses only some of them."""

    density: float
    scale: float
    ties_agreement: TiesAgreement
    seed: int
    tensor_name: str


@dataclass(frozen=True)
class TrunkMethod:
    """One trunk merge method with its paper reference and default parameters.

    ``merge(base, experts, weights, options)`` takes float32 tensors (``base`` may be None when
    ``needs_base`` is false) and the weights as a list of floats, and returns a float32 tensor.
    It owns ``experts`` and may overwrite them (to save memory); it never changes ``base``.
    """

    name: str
    reference: str
    needs_base: bool
    defaults: dict[str, float | int | str]
    description: str
    merge: Callable[..., torch.Tensor]
    # True: ``merge`` takes the experts in their stored dtype and converts one at a time,
    # never changing them (less memory); False: it takes float32 copies it may overwrite
    streams_experts: bool = False


def _merge_base(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    weights: list[float],
    options: TrunkMergeOptions,
) -> torch.Tensor:
    return base.clone()


def _merge_average(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    weights: list[float],
    options: TrunkMergeOptions,
) -> torch.Tensor:
    total = torch.zeros(experts[0].shape, dtype=torch.float32)  # [*shape]
    for w, expert in zip(weights, experts, strict=True):
        total.add_(expert, alpha=w)  # bf16 or float32 in, float32 arithmetic
    return total.div_(sum(weights))


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wᵢ tensorᵢ in one new accumulator (no per-term temporaries)."""
    total = torch.zeros_like(tensors[0])  # [*shape]
    for w, tensor in zip(weights, tensors, strict=True):
        total.add_(tensor, alpha=w)
    return total


def _task_vectors_in_place(base: torch.Tensor, experts: list[torch.Tensor]) -> list[torch.Tensor]:
    # the experts are our own float32 copies: turn each into its task vector in place
    return [expert.sub_(base) for expert in experts]


def _task_vector(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return expert.to(torch.float32, copy=True).sub_(base)  # [*shape] float32


def _merge_task_arithmetic(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    weights: list[float],
    options: TrunkMergeOptions,
) -> torch.Tensor:
    # one float32 task vector alive at a time
    merged = torch.zeros(base.shape, dtype=torch.float32)  # [*shape]
    for w, expert in zip(weights, experts, strict=True):
        merged.add_(_task_vector(base, expert), alpha=w)
    return merged.mul_(options.scale).add_(base)


def _combine_by_elected_sign(
    task_vectors: list[torch.Tensor], weights: list[float], agreement: TiesAgreement
) -> torch.Tensor:
    """Elect a sign per coordinate and combine the entries that agree with it; overwrites
    the task vectors.

    The elected sign is that of the weighted sum, i.e. the sign with the larger total
    magnitude. Zero entries (sign 0) never match a nonzero elected sign; a coordinate whose
    weighted sum is exactly zero elects sign 0, so only its zero entries match and it merges to 0.
    """
    elected = _weighted_sum(task_vectors, weights).sign_()  # [*shape] in {-1, 0, 1}

    # tv * elected, clamped at 0, is |tv| where tv agrees with a nonzero elected sign, else 0
    agreeing_sum = torch.zeros_like(elected)  # [*shape], magnitudes
    agreeing_weight = torch.zeros_like(elected) if agreement == "mean" else None
    for w, tv in zip(weights, task_vectors, strict=True):
        agreeing = tv.mul_(elected).clamp_(min=0.0)
        agreeing_sum.add_(agreeing, alpha=w)
        if agreeing_weight is not None:
            agreeing_weight.add_((agreeing > 0).to(agreeing_weight.dtype), alpha=w)
    agreeing_sum.mul_(elected)  # magnitudes back to signed values

    if agreeing_weight is None:
        return agreeing_sum
    # weighted mean; with unit weights this divides by the number of agreeing entries
    has_agreement = agreeing_weight > 0
    return torch.where(has_agreement, agreeing_sum / agreeing_weight.clamp_min(1e-30), 0.0)


def _merge_ties(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    weights: list[float],
    options: TrunkMergeOptions,
) -> torch.Tensor:
    task_vectors = _task_vectors_in_place(base, experts)
    trimmed = [trim_in_place(tv, options.density) for tv in task_vectors]
    merged = _combine_by_elected_sign(trimmed, weights, options.ties_agreement)
    return merged.mul_(options.scale).add_(base)


def _dropped_task_vectors(
    base: torch.Tensor, experts: list[torch.Tensor], options: TrunkMergeOptions
) -> list[torch.Tensor]:
    # one generator per (seed, tensor, expert): the same bytes in any call order or thread
    return [
        drop_in_place(tv, options.density, derive_seed(options.seed, options.tensor_name, index))
        for index, tv in enumerate(_task_vectors_in_place(base, experts))
    ]


def _merge_dare_linear(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    weights: list[float],
    options: TrunkMergeOptions,
) -> torch.Tensor:
    # one float32 task vector alive at a time
    merged = torch.zeros(base.shape, dtype=torch.float32)  # [*shape]
    for index, (w, expert) in enumerate(zip(weights, experts, strict=True)):
        seed = derive_seed(options.seed, options.tensor_name, index)
        merged.add_(drop_in_place(_task_vector(base, expert), options.density, seed), alpha=w)
    return merged.mul_(options.scale).add_(base)


def _merge_dare_ties(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    weights: list[float],
    options: TrunkMergeOptions,
) -> torch.Tensor:
    dropped = _dropped_task_vectors(base, experts, options)
    merged = _combine_by_elected_sign(dropped, weights, options.ties_agreement)
    return merged.mul_(options.scale).add_(base)


_TIES_REFERENCE = "Yadav et al. 2023, TIES-Merging, arXiv 2306.01708"
_DARE_REFERENCE = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv 2311.03099"
_SPARSE_DEFAULTS: dict[str, float | int | str] = {"density": PAPER_DENSITY, "scale": PAPER_SCALE}

TRUNK_METHODS: dict[str, TrunkMethod] = {
    method.name: method
    for method in (
        TrunkMethod(
            name="base",
            reference="Goddard et al. 2024, mergekit (mergekit-moe), arXiv 2403.13257",
            needs_base=True,
            defaults={},
            description="Copy the base model's tensor; the experts' trunks are ignored.",
            merge=_merge_base,
            streams_experts=True,
        ),
        TrunkMethod(
            name="average",
            reference="Sukhbaatar et al. 2024, Branch-Train-MiX, arXiv 2403.07816",
            needs_base=False,
            defaults={},
            description="Weighted mean of the experts, normalised by the sum of the weights.",
            merge=_merge_average,
            streams_experts=True,
        ),
        TrunkMethod(
            name="task_arithmetic",
            reference="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv 2212.04089",
            needs_base=True,
            defaults={"scale": PAPER_SCALE},
            description="base + scale * weighted sum of the task vectors.",
            merge=_merge_task_arithmetic,
            streams_experts=True,
        ),
        TrunkMethod(
            name="ties",
            reference=_TIES_REFERENCE,
            needs_base=True,
            defaults={**_SPARSE_DEFAULTS, "ties_agreement": "sum"},
            description="Trim task vectors by magnitude, elect a sign, merge agreeing entries.",
            merge=_merge_ties,
        ),
        TrunkMethod(
            name="dare_linear",
            reference=_DARE_REFERENCE,
            needs_base=True,
            defaults=dict(_SPARSE_DEFAULTS),
            description="Randomly drop task-vector entries, rescale by 1/density, sum them.",
            merge=_merge_dare_linear,
            streams_experts=True,
        ),
        TrunkMethod(
            name="dare_ties",
            reference=f"{_DARE_REFERENCE}; sign election from {_TIES_REFERENCE}",
            needs_base=True,
            defaults={**_SPARSE_DEFAULTS, "ties_agreement": "sum"},
            description="DARE's random drop and rescale, then TIES sign election and agreement.",
            merge=_merge_dare_ties,
        ),
    )
}


def _check_inputs(
    method: TrunkMethod,
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    weights: list[float],
    density: float,
    ties_agreement: str,
    tensor_name: str,
) -> None:
    """Raise ``ValueError`` for the first bad input, naming the tensor and the fix."""
    label = f"tensor {tensor_name!r}" if tensor_name else "unnamed tensor"
    if not experts:
        raise ValueError(f"{label}: trunk method {method.name!r} got no expert tensors")
    if method.needs_base and base is None:
        raise ValueError(
            f"{label}: trunk method {method.name!r} needs the base model's tensor; pass `base`, "
            "or use 'average', which needs no base"
        )

    # every tensor must have the shape of the first one given
    reference_name, reference = ("base", base) if base is not None else ("expert 0", experts[0])
    for index, expert in enumerate(experts):
        if expert.shape != reference.shape:
            raise ValueError(
                f"{label}: expert {index} has shape {tuple(expert.shape)} but {reference_name} "
                f"has shape {tuple(reference.shape)}; all experts must be fine-tunes of one base"
            )

    if len(weights) != len(experts):
        raise ValueError(
            f"{label}: got {len(weights)} weights for {len(experts)} experts; pass one weight "
            "per expert, or none for equal weights"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"{label}: expert weights {weights} must be non-negative with a positive sum"
        )
    if "density" in method.defaults and not 0 < density <= 1:
        raise ValueError(
            f"{label}: density {density} is outside (0, 1]; it is the fraction of each task "
            f"vector kept (the paper uses {PAPER_DENSITY})"
        )
    if "ties_agreement" in method.defaults and ties_agreement not in ("sum", "mean"):
        raise ValueError(f"{label}: ties_agreement {ties_agreement!r} is not one of 'sum', 'mean'")


def merge_trunk_tensor(
    method: str,
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    *,
    weights: list[float] | None = None,
    density: float = PAPER_DENSITY,
    scale: float = PAPER_SCALE,
    ties_agreement: TiesAgreement = "sum",
    seed: int = 0,
    tensor_name: str = "",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one trunk tensor from the base model's and the experts' copies.

    Args:
        method: a key of ``TRUNK_METHODS``.
        base: the base model's tensor; may be None for methods that do not need it.
        experts: each expert's tensor, all of the base's shape.
        weights: one non-negative weight per expert; None means 1 for each.
        density: fraction of each task vector kept (ties, dare_linear, dare_ties).
        scale: factor on the merged task vector (λ in the paper).
        ties_agreement: combine sign-agreeing entries by their ``"sum"`` (the TIES paper)
            or their weighted ``"mean"`` (mergekit's default).
        seed: run seed for the random drop of the dare methods.
        tensor_name: the tensor's name; part of the dare drop seed and of error messages.
        out_dtype: dtype of the result; None means the base's dtype, or expert 0's without base.

    Returns:
        A new tensor of the inputs' shape, on their device, in ``out_dtype``.

    Raises:
        ValueError: unknown method, missing base, mismatched shapes, wrong number of weights,
            negative weights, density outside (0, 1] or an unknown ties_agreement.
    """
    if method not in TRUNK_METHODS:
        raise ValueError(
            f"unknown trunk merge method {method!r} for tensor {tensor_name!r}; "
            f"known methods: {', '.join(TRUNK_METHODS)}"
        )
    entry = TRUNK_METHODS[method]
    weights = [1.0] * len(experts) if weights is None else [float(w) for w in weights]
    _check_inputs(entry, base, experts, weights, density, ties_agreement, tensor_name)

    if entry.name.startswith("dare") and not tensor_name:
        logger.warning(
            "dare merge without a tensor_name: every unnamed tensor of one shape gets the same "
            "drop mask; pass the tensor's name"
        )
    options = TrunkMergeOptions(density, scale, ties_agreement, seed, tensor_name)

    # float32 arithmetic whatever the stored dtype; the merge functions may overwrite
    # experts32 when they are fresh copies, but never base32 (may be the caller's tensor)
    base32 = base.float() if base is not None else None
    if entry.streams_experts:
        experts32 = experts
    else:
        experts32 = [expert.to(torch.float32, copy=True) for expert in experts]
    merged = entry.merge(base32, experts32, weights, options)  # [*shape] float32

    result_dtype = out_dtype or (base.dtype if base is not None else experts[0].dtype)
    logger.debug("merged trunk tensor %s with %s", tensor_name, method)
    return merged.to(result_dtype)
