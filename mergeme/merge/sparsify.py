"""Sparsifying a task vector: keep its largest entries (TIES) or drop entries at random (DARE).

``keep_largest_magnitude`` and ``drop_and_rescale`` return a new tensor and leave their input
alone; the ``*_in_place`` variants overwrite their input, which saves a full-size allocation
per expert and tensor when the caller owns the task vector.
"""

from __future__ import annotations

import hashlib
import math

import torch

# below this many entries torch.kthvalue is fast enough on its own
SMALL_SELECTION = 1 << 20
SAMPLE_SIZE = 1 << 16
# sample ranks either side of the target: about 8 standard deviations of a sample quantile
SAMPLE_MARGIN = 1024


def keep_count(numel: int, density: float) -> int:
    """Return how many of ``numel`` entries a ``density`` fraction keeps.

    The count is ``density * numel`` rounded to the nearest whole number, halves rounded up,
    and never below one for a non-empty tensor. Rounding to the nearest (rather than taking
    the ceiling) keeps float noise such as ``0.8 * 5 == 4.000000000000001`` from adding an entry.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 0.5)))


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th smallest (1-based) entry of the flat tensor ``values``, exactly.

    ``torch.kthvalue`` is single-threaded and slow on tens of millions of entries, so on large
    tensors a strided sample first brackets the answer; only the entries inside the bracket
    are then selected exactly. If the bracket misses (very unlikely), the full selection runs.
    """
    numel = values.numel()
    if numel <= SMALL_SELECTION:
        return torch.kthvalue(values, rank).values

    # bracket the quantile with sample ranks about 8 standard deviations either side
    sample = values[:: numel // SAMPLE_SIZE].sort().values  # [~SAMPLE_SIZE]
    middle = int(rank / numel * sample.numel())
    low = sample[max(0, middle - SAMPLE_MARGIN)]
    high = sample[min(sample.numel() - 1, middle + SAMPLE_MARGIN)]

    below = int((values < low).sum())
    inside = values[(values >= low) & (values <= high)]  # [band]
    if below < rank <= below + inside.numel():
        return torch.kthvalue(inside, rank - below).values
    return torch.kthvalue(values, rank).values


def trim_in_place(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the largest-magnitude entries of ``task_vector``, in place; return it.

    Keeps ``keep_count(numel, density)`` entries. Entries whose magnitude equals the
    threshold are kept in flat (row-major) index order until the count is reached, so the
    result never depends on the sort algorithm or the device.
    """
    numel = task_vector.numel()
    k = keep_count(numel, density)
    if k >= numel:
        return task_vector

    # threshold: the k-th largest magnitude is the (numel - k + 1)-th smallest
    magnitude = task_vector.abs().flatten()  # [numel]
    threshold = kth_smallest(magnitude, numel - k + 1)  # []
    keep = magnitude >= threshold  # [numel] bool

    # more than k at or above the threshold: keep only the first tied entries by flat index
    if int(keep.sum()) > k:
        keep = magnitude > threshold
        tied = torch.nonzero(magnitude == threshold).squeeze(1)  # [n_tied], ascending
        keep[tied[: k - int(keep.sum())]] = True

    return task_vector.masked_fill_(keep.logical_not_().view_as(task_vector), 0.0)


def keep_largest_magnitude(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Return a copy of ``task_vector`` with all but its largest-magnitude entries set to
    zero (see ``trim_in_place`` for the count and the order of tied entries)."""
    return trim_in_place(task_vector.clone(), density)


def derive_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """Return a 64-bit generator seed that depends only on its three arguments.

    A stable hash (BLAKE2b) is used rather than Python's ``hash``, which is salted per
    process, so the same run seed gives the same drop masks in every process and thread.
    """
    key = f"{seed}\x00{tensor_name}\x00{expert_index}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def drop_in_place(task_vector: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Drop each entry of ``task_vector`` with probability ``1 - density`` and divide the
    kept ones by ``density`` (so the expected value is unchanged), in place; return it.

    The mask is drawn on the CPU from a generator seeded with ``seed``, then moved to the
    tensor's device, so the same seed gives the same mask on every device.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # torch.rand lies in [0, 1): density 1 keeps every entry
    draws = torch.rand(task_vector.shape, generator=generator)  # [*shape]
    dropped = (draws >= density).to(task_vector.device)  # [*shape] bool
    return task_vector.div_(density).masked_fill_(dropped, 0.0)


def drop_and_rescale(task_vector: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Return a copy of ``task_vector`` with the DARE drop and rescale applied
    (see ``drop_in_place``)."""
    return drop_in_place(task_vector.clone(), density, seed)
