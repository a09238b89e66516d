"""TIES and DARE written out plainly for tests: whole tensors, float64, one step per line.

These follow the method definitions directly (sort to trim, a drop mask, the sign of the
weighted sum, the agreeing entries) with none of the library's chunking, fused sums or
folded scales, so that the two can be compared.
"""

from __future__ import annotations

import math

import torch

from mergeme.merge.sparsify import derive_seed


def plain_trim(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density · numel) largest magnitudes; among equal magnitudes the lower
    flat index wins (a stable sort); zero the rest."""
    flat = task_vector.flatten()
    count = min(flat.numel(), max(1, math.floor(density * flat.numel() + 0.5)))
    kept_indices = torch.sort(-flat.abs(), stable=True).indices[:count]
    kept = torch.zeros_like(flat)
    kept[kept_indices] = flat[kept_indices]
    return kept.view_as(task_vector)


def plain_drop(task_vector: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE: keep an entry when its uniform draw is below density, and divide it by density."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(task_vector.shape, generator=generator).double()
    return torch.where(draws < density, task_vector / density, torch.zeros_like(task_vector))


def plain_elect(task_vectors: list[torch.Tensor], weights: list[float], agreement: str):
    """Elect the sign of the weighted sum per coordinate; sum (or weighted-mean) the entries
    of that sign; zero where the sum is zero."""
    total = sum(w * tv for w, tv in zip(weights, task_vectors, strict=True))
    elected = torch.sign(total)
    agreeing_sum = torch.zeros_like(total)
    agreeing_weight = torch.zeros_like(total)
    for w, tv in zip(weights, task_vectors, strict=True):
        agrees = (torch.sign(tv) == elected) & (elected != 0)
        agreeing_sum += torch.where(agrees, w * tv, 0.0)
        agreeing_weight += torch.where(agrees, w, 0.0)
    if agreement == "sum":
        return agreeing_sum
    return torch.where(agreeing_weight > 0, agreeing_sum / agreeing_weight, 0.0)


def plain_merge(method, base, experts, *, weights, density, scale, agreement, seed, name):
    """base + scale · merged task vector, for ``ties``, ``dare_ties`` or ``dare_linear``;
    float64 of the inputs' shape."""
    base64 = base.double()
    task_vectors = [expert.double() - base64 for expert in experts]
    weights = weights or [1.0] * len(experts)
    if method == "ties":
        trimmed = [plain_trim(tv, density) for tv in task_vectors]
        return base64 + scale * plain_elect(trimmed, weights, agreement)
    dropped = [
        plain_drop(tv, density, derive_seed(seed, name, index))
        for index, tv in enumerate(task_vectors)
    ]
    if method == "dare_ties":
        return base64 + scale * plain_elect(dropped, weights, agreement)
    return base64 + scale * sum(w * tv for w, tv in zip(weights, dropped, strict=True))
