"""Sparsifying a task vector: keep its largest entries (TIES) or drop entries at random (DARE).

Both helpers take one float task vector and return a new tensor of the same shape; neither
changes its input.
"""

from __future__ import annotations

import hashlib
import math

import torch


def keep_count(numel: int, density: float) -> int:
    """Return how many of ``numel`` entries a ``density`` fraction keeps.

    The count is ``density * numel`` rounded to the nearest whole number, halves rounded up,
    and never below one for a non-empty tensor. Rounding to the nearest (rather than taking
    the ceiling) keeps float noise such as ``0.8 * 5 == 4.000000000000001`` from adding an entry.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 0.5)))


def keep_largest_magnitude(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Return ``task_vector`` with all but its largest-magnitude entries set to zero.

    Keeps ``keep_count(numel, density)`` entries. Entries whose magnitude equals the
    threshold are kept in flat (row-major) index order until the count is reached, so the
    result never depends on the sort algorithm or the device.
    """
    numel = task_vector.numel()
    k = keep_count(numel, density)
    if k >= numel:
        return task_vector.clone()

    # threshold: the k-th largest magnitude is the (numel - k + 1)-th smallest
    magnitude = task_vector.abs().flatten()  # [numel]
    threshold = torch.kthvalue(magnitude, numel - k + 1).values  # []

    # everything above the threshold, then the first tied entries by flat index
    keep = magnitude > threshold  # [numel] bool
    tied = torch.nonzero(magnitude == threshold).squeeze(1)  # [n_tied], ascending
    n_from_tied = k - int(keep.sum())
    keep[tied[:n_from_tied]] = True

    return torch.where(keep.view_as(task_vector), task_vector, 0.0)


def derive_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """Return a 64-bit generator seed that depends only on its three arguments.

    A stable hash (BLAKE2b) is used rather than Python's ``hash``, which is salted per
    process, so the same run seed gives the same drop masks in every process and thread.
    """
    key = f"{seed}\x00{tensor_name}\x00{expert_index}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def drop_and_rescale(task_vector: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Return ``task_vector`` with each entry dropped with probability ``1 - density``.

    Kept entries are divided by ``density`` so the expected value equals the input. The mask
    is drawn on the CPU from a generator seeded with ``seed``, then moved to the tensor's
    device, so the same seed gives the same mask on every device.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # torch.rand lies in [0, 1): density 1 keeps every entry
    keep = torch.rand(task_vector.shape, generator=generator) < density  # [*shape] bool
    keep = keep.to(task_vector.device)
    return torch.where(keep, task_vector / density, 0.0)
