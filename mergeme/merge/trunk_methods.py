"""Trunk merge methods: how the non-expert weights of the MoE are built from the experts.

The trunk (embeddings, attention, norms, head) has one copy in the MoE, so each trunk tensor
must be merged from the experts' copies. Every method here is a pure function of one tensor
name's base and expert copies; ``TRUNK_METHODS`` is the registry, ``merge_trunk_tensor`` (for
tensors in memory) and ``merge_trunk_sources`` (for tensors read from checkpoints) the entry
points that validate inputs and return the result in the requested dtype.

A task vector is ``expert - base``. All arithmetic runs in float32, chunk by chunk over the
flattened tensor (``flat.py``): besides the output, no full-size float32 tensor is allocated,
and only one expert's task vector chunk exists at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergeme.merge.defaults import (
    DEFAULT_SEED,
    DEFAULT_TIES_AGREEMENT,
    PAPER_DENSITY,
    PAPER_SCALE,
    TRUNK_METHOD_DEFAULTS,
    TiesAgreement,
)
from mergeme.merge.flat import FlatSource, TensorSource, chunk_ranges, numel_of, work_buffer
from mergeme.merge.sparsify import DropMask, TrimRule, derive_seed, trim_rule

logger = logging.getLogger(__name__)

__all__ = [
    "PAPER_DENSITY",
    "PAPER_SCALE",
    "TRUNK_METHODS",
    "TiesAgreement",
    "TrunkMergeOptions",
    "TrunkMethod",
    "merge_trunk_sources",
    "merge_trunk_tensor",
]


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

    ``merge(base, experts, weights, options, out)`` reads the base's (None when ``needs_base``
    is false) and the experts' copies chunk by chunk and writes every entry of ``out`` (1-D,
    the output dtype).
    """

    name: str
    reference: str
    needs_base: bool
    defaults: dict[str, float | int | str]
    description: str
    merge: Callable[..., None]


# per-chunk building blocks: every buffer is a reused work buffer of chunk size


def _base_chunk(base: FlatSource, start: int, stop: int) -> torch.Tensor:
    return work_buffer("base", stop - start).copy_(base.read(start, stop, "base"))  # [n] f32


def _task_vector(expert: FlatSource, base32: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    chunk = work_buffer("task_vector", stop - start)  # [n] f32
    return chunk.copy_(expert.read(start, stop, "expert")).sub_(base32)


def _merge_base(base, experts, weights, options, out: torch.Tensor) -> None:
    for start, stop in chunk_ranges(out.numel()):
        out[start:stop].copy_(_base_chunk(base, start, stop))


def _merge_average(base, experts, weights, options, out: torch.Tensor) -> None:
    total_weight = sum(weights)
    for start, stop in chunk_ranges(out.numel()):
        total = work_buffer("total", stop - start).zero_()  # [n] f32
        converted = work_buffer("task_vector", stop - start)  # [n] f32
        for w, expert in zip(weights, experts, strict=True):
            # convert first: adding a bf16 tensor to a float32 one directly is ten times slower
            total.add_(converted.copy_(expert.read(start, stop, "expert")), alpha=w)
        out[start:stop].copy_(total.div_(total_weight))


def _merge_task_arithmetic(base, experts, weights, options, out: torch.Tensor) -> None:
    for start, stop in chunk_ranges(out.numel()):
        base32 = _base_chunk(base, start, stop)
        merged = work_buffer("total", stop - start).zero_()  # [n] f32
        for w, expert in zip(weights, experts, strict=True):
            merged.add_(_task_vector(expert, base32, start, stop), alpha=w)
        out[start:stop].copy_(merged.mul_(options.scale).add_(base32))


def _merge_dare_linear(base, experts, weights, options, out: torch.Tensor) -> None:
    masks = _drop_masks(len(experts), options)
    for start, stop in chunk_ranges(out.numel()):
        base32 = _base_chunk(base, start, stop)
        merged = work_buffer("total", stop - start).zero_()  # [n] f32
        for w, expert, mask in zip(weights, experts, masks, strict=True):
            task_vector = _task_vector(expert, base32, start, stop)
            mask.apply(task_vector)
            merged.add_(task_vector, alpha=w)
        # the kept entries' 1/density rescale, folded into the final scale (one pass less)
        out[start:stop].copy_(merged.mul_(options.scale / options.density).add_(base32))


def _drop_masks(count: int, options: TrunkMergeOptions) -> list[DropMask]:
    # one generator per (seed, tensor, expert): the same bytes in any call order or thread
    return [
        DropMask(options.density, derive_seed(options.seed, options.tensor_name, index))
        for index in range(count)
    ]


class _SignElection:
    """Per-chunk sums for TIES' sign election: Σ w·τ, Σ w·max(τ, 0), Σ w·min(τ, 0), and for
    the mean the weights of the positive and of the negative entries.

    The elected sign is that of Σ w·τ (the sign with the larger total magnitude). The entries
    agreeing with a positive sign sum to the positive part, those agreeing with a negative sign
    to the negative part, so no per-expert sign product is needed. A coordinate whose sum is
    exactly zero elects no sign and merges to zero.
    """

    def __init__(self, numel: int, agreement: TiesAgreement):
        self.mean = agreement == "mean"
        names = ("total", "positive", "negative", "positive_weight", "negative_weight")
        count = 5 if self.mean else 3
        self.sums = [work_buffer(name, numel).zero_() for name in names[:count]]  # [n] f32 each

    def add(self, task_vector: torch.Tensor, w: float) -> None:
        part = work_buffer("part", task_vector.numel())  # [n] f32
        self.sums[0].add_(task_vector, alpha=w)
        self.sums[1].add_(torch.clamp(task_vector, min=0.0, out=part), alpha=w)
        self.sums[2].add_(torch.clamp(task_vector, max=0.0, out=part), alpha=w)
        if self.mean:
            sign = work_buffer("sign", task_vector.numel(), torch.bool)  # [n]
            self.sums[3].add_(torch.gt(task_vector, 0.0, out=sign), alpha=w)
            self.sums[4].add_(torch.lt(task_vector, 0.0, out=sign), alpha=w)

    def merged(self) -> torch.Tensor:
        """The merged task vector chunk (float32 [n], a work buffer)."""
        total = self.sums[0]
        positive = torch.gt(total, 0.0, out=work_buffer("sign", total.numel(), torch.bool))
        merged = torch.where(
            positive, self.sums[1], self.sums[2], out=work_buffer("merged", total.numel())
        )
        if self.mean:
            # weighted mean; with unit weights this divides by the number of agreeing entries
            weight = torch.where(
                positive, self.sums[3], self.sums[4], out=work_buffer("weight", total.numel())
            )
            merged.div_(weight.clamp_min_(1e-30))
        return merged.masked_fill_(torch.eq(total, 0.0, out=positive), 0.0)


def _merge_by_elected_sign(base, experts, weights, options, out, sparsifiers, scale) -> None:
    """Sparsify each task vector chunk in place (``sparsifiers[i](chunk, start)``), elect signs,
    combine the agreeing entries, and write base + scale · merged."""
    for start, stop in chunk_ranges(out.numel()):
        base32 = _base_chunk(base, start, stop)
        election = _SignElection(stop - start, options.ties_agreement)
        for w, expert, sparsify in zip(weights, experts, sparsifiers, strict=True):
            task_vector = _task_vector(expert, base32, start, stop)
            sparsify(task_vector, start)
            election.add(task_vector, w)
        out[start:stop].copy_(election.merged().mul_(scale).add_(base32))


def _trim_rules(
    base: FlatSource, experts: list[FlatSource], density: float
) -> list[TrimRule | None]:
    """A first pass per expert: the exact magnitude threshold of its task vector."""
    numel = numel_of(base.shape)
    base_samples: dict[int, torch.Tensor] = {}
    rules = []
    for expert in experts:

        def magnitudes(start: int, stop: int, expert: FlatSource = expert) -> torch.Tensor:
            base32 = _base_chunk(base, start, stop)
            return _task_vector(expert, base32, start, stop).abs_()  # [n] f32

        def sample_at(stride: int, expert: FlatSource = expert) -> torch.Tensor:
            # a float32 source's strided read is a view of the caller's tensor: never in place
            if stride not in base_samples:
                base_samples[stride] = base.read_strided(stride, "base").float()
            expert_sample = expert.read_strided(stride, "expert").float()
            return torch.sub(expert_sample, base_samples[stride]).abs_()

        rules.append(trim_rule(magnitudes, sample_at, numel, density))
    return rules


def _merge_ties(base, experts, weights, options, out: torch.Tensor) -> None:
    rules = _trim_rules(base, experts, options.density)

    def trimmer(rule: TrimRule | None) -> Callable[[torch.Tensor, int], None]:
        def trim(chunk: torch.Tensor, start: int) -> None:
            if rule is not None:
                magnitude = torch.abs(chunk, out=work_buffer("magnitude", chunk.numel()))
                rule.apply(chunk, magnitude, start)

        return trim

    sparsifiers = [trimmer(rule) for rule in rules]
    _merge_by_elected_sign(base, experts, weights, options, out, sparsifiers, options.scale)


def _merge_dare_ties(base, experts, weights, options, out: torch.Tensor) -> None:
    sparsifiers = [
        lambda chunk, start, mask=mask: mask.apply(chunk)
        for mask in _drop_masks(len(experts), options)
    ]
    # a common positive factor changes no elected sign: fold 1/density into the final scale
    scale = options.scale / options.density
    _merge_by_elected_sign(base, experts, weights, options, out, sparsifiers, scale)


_TIES_REFERENCE = "Yadav et al. 2023, TIES-Merging, arXiv 2306.01708"
_DARE_REFERENCE = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv 2311.03099"


def _method(name: str, reference: str, description: str, merge: Callable[..., None]) -> TrunkMethod:
    return TrunkMethod(
        name=name,
        reference=reference,
        needs_base=name != "average",
        defaults=dict(TRUNK_METHOD_DEFAULTS[name]),
        description=description,
        merge=merge,
    )


TRUNK_METHODS: dict[str, TrunkMethod] = {
    method.name: method
    for method in (
        _method(
            "base",
            "Goddard et al. 2024, mergekit (mergekit-moe), arXiv 2403.13257",
            "Copy the base model's tensor; the experts' trunks are ignored.",
            _merge_base,
        ),
        _method(
            "average",
            "Sukhbaatar et al. 2024, Branch-Train-MiX, arXiv 2403.07816",
            "Weighted mean of the experts, normalised by the sum of the weights.",
            _merge_average,
        ),
        _method(
            "task_arithmetic",
            "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv 2212.04089",
            "base + scale * weighted sum of the task vectors.",
            _merge_task_arithmetic,
        ),
        _method(
            "ties",
            _TIES_REFERENCE,
            "Trim task vectors by magnitude, elect a sign, merge agreeing entries.",
            _merge_ties,
        ),
        _method(
            "dare_linear",
            _DARE_REFERENCE,
            "Randomly drop task-vector entries, rescale by 1/density, sum them.",
            _merge_dare_linear,
        ),
        _method(
            "dare_ties",
            f"{_DARE_REFERENCE}; sign election from {_TIES_REFERENCE}",
            "DARE's random drop and rescale, then TIES sign election and agreement.",
            _merge_dare_ties,
        ),
    )
}


def _check_inputs(
    method: TrunkMethod,
    base: FlatSource | None,
    experts: list[FlatSource],
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


def merge_trunk_sources(
    method: str,
    base: FlatSource | None,
    experts: list[FlatSource],
    *,
    weights: list[float] | None = None,
    density: float = PAPER_DENSITY,
    scale: float = PAPER_SCALE,
    ties_agreement: TiesAgreement = DEFAULT_TIES_AGREEMENT,
    seed: int = DEFAULT_SEED,
    tensor_name: str = "",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one trunk tensor from the base's and the experts' copies, read chunk by chunk.

    Takes the same arguments as ``merge_trunk_tensor``, with ``FlatSource`` copies instead of
    tensors (``CheckpointSource`` reads them from checkpoint files). Returns a new CPU tensor
    of the inputs' shape in ``out_dtype``; raises what ``merge_trunk_tensor`` raises.
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
    reference = base if base is not None else experts[0]
    out = torch.empty(reference.shape, dtype=out_dtype or reference.dtype)  # [*shape]
    entry.merge(base, experts, weights, options, out.view(-1))
    logger.debug("merged trunk tensor %s with %s", tensor_name, method)
    return out


def merge_trunk_tensor(
    method: str,
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    *,
    weights: list[float] | None = None,
    density: float = PAPER_DENSITY,
    scale: float = PAPER_SCALE,
    ties_agreement: TiesAgreement = DEFAULT_TIES_AGREEMENT,
    seed: int = DEFAULT_SEED,
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
        A new CPU tensor of the inputs' shape in ``out_dtype``; the inputs are not changed.

    Raises:
        ValueError: unknown method, missing base, mismatched shapes, wrong number of weights,
            negative weights, density outside (0, 1] or an unknown ties_agreement.
    """
    return merge_trunk_sources(
        method,
        TensorSource(base) if base is not None else None,
        [TensorSource(expert) for expert in experts],
        weights=weights,
        density=density,
        scale=scale,
        ties_agreement=ties_agreement,
        seed=seed,
        tensor_name=tensor_name,
        out_dtype=out_dtype,
    )
