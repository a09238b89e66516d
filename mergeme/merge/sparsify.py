"""Sparsifying a task vector: keep its largest entries (TIES) or drop entries at random (DARE).

TIES trimming is split in two so that it can run chunk by chunk without a full-size float32
copy: ``trim_rule`` finds, in a first pass over the magnitudes, the exact threshold and up to
which flat index entries equal to it are kept; ``TrimRule.apply`` then trims any chunk. DARE draws
its mask chunk by chunk from one generator per (seed, tensor, expert); consecutive draws of one
generator give the same numbers as one large draw, so the mask does not depend on the chunking.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergeme.merge.flat import chunk_ranges, work_buffer

# below this many entries torch.kthvalue on everything is fast enough
SMALL_SELECTION = 1 << 20
SAMPLE_SIZE = 1 << 16
# sample ranks either side of the target: about 8 standard deviations of a sample quantile
SAMPLE_MARGIN = 1024

# magnitudes(start, stop) -> float32 [stop - start], valid until the next call
Magnitudes = Callable[[int, int], torch.Tensor]


def keep_count(numel: int, density: float) -> int:
    """Return how many of ``numel`` entries a ``density`` fraction keeps.

    The count is ``density * numel`` rounded to the nearest whole number, halves rounded up,
    and never below one for a non-empty tensor. Rounding to the nearest (rather than taking
    the ceiling) keeps float noise such as ``0.8 * 5 == 4.000000000000001`` from adding an entry.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 0.5)))


@dataclass(frozen=True)
class Selection:
    """The ``rank``-th smallest value and how many values lie strictly below and at most at it."""

    value: float
    below: int
    at_most: int


def _counted(values: torch.Tensor, kth: torch.Tensor, offset: int = 0) -> Selection:
    below = offset + int(torch.count_nonzero(values < kth))
    return Selection(kth.item(), below, offset + int(torch.count_nonzero(values <= kth)))


def select_kth(values: Magnitudes, sample: torch.Tensor, numel: int, rank: int) -> Selection:
    """The ``rank``-th smallest (1-based) of ``numel`` values given chunk by chunk, exactly.

    ``torch.kthvalue`` is single-threaded and slow on tens of millions of entries, so on large
    inputs the ``sample`` (values at a fixed stride) brackets the answer; one pass counts the
    values below the bracket and collects those inside it, and only those are selected exactly.
    If the bracket misses (very unlikely), the full selection runs.
    """
    if numel <= SMALL_SELECTION:
        everything = values(0, numel)  # [numel]
        return _counted(everything, torch.kthvalue(everything, rank).values)

    # bracket the quantile with sample ranks about 8 standard deviations either side
    ordered = sample.sort().values  # [~SAMPLE_SIZE]
    middle = min(int(rank / numel * ordered.numel()), ordered.numel() - 1)
    low = ordered[max(0, middle - SAMPLE_MARGIN)].item()
    high = ordered[min(ordered.numel() - 1, middle + SAMPLE_MARGIN)].item()

    below, inside = 0, []
    for start, stop in chunk_ranges(numel):
        chunk = values(start, stop)  # [n]
        below += int(torch.count_nonzero(chunk < low))
        inside.append(chunk[(chunk >= low) & (chunk <= high)])  # [band part]
    band = torch.cat(inside)  # [band]
    if below < rank <= below + band.numel():
        return _counted(band, torch.kthvalue(band, rank - below).values, offset=below)

    everything = torch.cat([values(start, stop).clone() for start, stop in chunk_ranges(numel)])
    return _counted(everything, torch.kthvalue(everything, rank).values)


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th smallest (1-based) entry of the flat tensor ``values``, exactly."""
    stride = max(1, values.numel() // SAMPLE_SIZE)
    selection = select_kth(lambda a, b: values[a:b], values[::stride], values.numel(), rank)
    return torch.tensor(selection.value, dtype=values.dtype)


@dataclass(frozen=True)
class TrimRule:
    """Which entries of a task vector TIES keeps: every entry whose magnitude exceeds
    ``threshold``, and those equal to it up to flat index ``ties_until`` (inclusive; -1 keeps
    none of them)."""

    threshold: float
    ties_until: int

    @property
    def just_below(self) -> float:
        """The largest float32 below the threshold: ``x > just_below`` is ``x >= threshold``."""
        threshold = torch.tensor(self.threshold, dtype=torch.float32)
        return torch.nextafter(threshold, torch.tensor(-math.inf)).item()

    def apply(self, chunk: torch.Tensor, magnitude: torch.Tensor, start: int) -> None:
        """Zero the trimmed entries of ``chunk`` (float32 [n], flat entries from ``start``),
        in place; ``magnitude`` is ``chunk.abs()`` and is overwritten."""
        # keep the tied entries up to ties_until, drop those after it
        cut = min(max(self.ties_until + 1 - start, 0), chunk.numel())
        if cut:
            torch.nn.functional.threshold_(magnitude[:cut], self.just_below, 0.0)
        if cut < chunk.numel():
            torch.nn.functional.threshold_(magnitude[cut:], self.threshold, 0.0)
        torch.copysign(magnitude, chunk, out=chunk)  # |x| kept or 0, with x's sign


def trim_rule(
    magnitudes: Magnitudes, sample_at: Callable[[int], torch.Tensor], numel: int, density: float
) -> TrimRule | None:
    """The rule that keeps the ``keep_count(numel, density)`` largest-magnitude entries, ties
    at the threshold broken by flat index; None when every entry is kept.

    ``sample_at(stride)`` returns the magnitudes at flat indexes 0, stride, 2·stride, ...
    """
    k = keep_count(numel, density)
    if k >= numel:
        return None
    # the k-th largest magnitude is the (numel - k + 1)-th smallest
    stride = max(1, numel // SAMPLE_SIZE)
    sample = sample_at(stride) if numel > SMALL_SELECTION else torch.empty(0)
    selection = select_kth(magnitudes, sample, numel, numel - k + 1)
    ties_kept = k - (numel - selection.at_most)  # entries equal to the threshold kept, >= 1
    if ties_kept == selection.at_most - selection.below:  # every tie is kept
        return TrimRule(selection.value, numel)
    return TrimRule(selection.value, _index_of_tie(magnitudes, numel, selection.value, ties_kept))


def _index_of_tie(magnitudes: Magnitudes, numel: int, threshold: float, rank: int) -> int:
    """Flat index of the ``rank``-th (1-based) entry equal to ``threshold``."""
    seen = 0
    for start, stop in chunk_ranges(numel):
        tied = magnitudes(start, stop) == threshold  # [n] bool
        count = int(torch.count_nonzero(tied))
        if seen + count >= rank:
            return start + int(tied.nonzero()[rank - seen - 1])
        seen += count
    raise AssertionError(f"fewer than {rank} entries equal the threshold {threshold}")


def trim_in_place(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``keep_count`` largest-magnitude entries of ``task_vector`` (float32,
    contiguous), in place; return it. Entries whose magnitude equals the threshold are kept in
    flat (row-major) order until the count is reached, so the result never depends on the sort
    algorithm or the device."""
    flat = task_vector.view(-1)  # [numel]

    def magnitudes(start: int, stop: int) -> torch.Tensor:
        out = work_buffer("trim:magnitude", stop - start)
        return torch.abs(flat[start:stop], out=out)

    rule = trim_rule(magnitudes, lambda stride: flat[::stride].abs(), flat.numel(), density)
    if rule is not None:
        for start, stop in chunk_ranges(flat.numel()):
            rule.apply(flat[start:stop], magnitudes(start, stop), start)
    return task_vector


def keep_largest_magnitude(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Return a copy of ``task_vector`` with all but its largest-magnitude entries set to
    zero (see ``trim_in_place`` for the count and the order of tied entries)."""
    return trim_in_place(task_vector.to(torch.float32, copy=True), density)


def derive_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """Return a 64-bit generator seed that depends only on its three arguments.

    A stable hash (BLAKE2b) is used rather than Python's ``hash``, which is salted per
    process, so the same run seed gives the same drop masks in every process and thread.
    """
    key = f"{seed}\x00{tensor_name}\x00{expert_index}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little")


class DropMask:
    """DARE's random drop for one (seed, tensor, expert), drawn chunk by chunk in flat order.

    Entry j is dropped when the j-th draw of ``torch.rand`` from a CPU generator seeded with
    ``seed`` is at least ``density`` (draws lie in [0, 1), so density 1 keeps everything).
    """

    def __init__(self, density: float, seed: int):
        self.density = density
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def apply(self, chunk: torch.Tensor) -> None:
        """Zero the dropped entries of the next ``chunk`` (float32 [n], in place)."""
        count = chunk.numel()
        draws = torch.rand(count, generator=self.generator, out=work_buffer("drop:draws", count))
        dropped = torch.ge(draws, self.density, out=work_buffer("drop:mask", count, torch.bool))
        chunk.masked_fill_(dropped, 0.0)
