"""Flat, chunked access to one trunk tensor's copies, and reusable work buffers.

The trunk methods walk a tensor's flattened entries in chunks of ``CHUNK`` entries: for each
chunk they read that range of the base's and every expert's copy, compute in float32 work
buffers of chunk size, and write the range of the output. Nothing of full tensor size is
allocated besides the output, and the work buffers stay small enough to live in the CPU cache.

A ``FlatSource`` is one copy of the tensor: ``TensorSource`` wraps a tensor in memory,
``CheckpointSource`` reads ranges straight from a checkpoint's file into reused buffers, so a
merge holds chunks of its inputs, never whole tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from mergeme.checkpoint import Checkpoint

# 256 Ki entries: 1 MiB per float32 work buffer, so a method's dozen buffers stay in cache
CHUNK = 1 << 18


class FlatSource(Protocol):
    """One copy of a tensor, read by ranges of its flattened entries."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, start: int, stop: int, slot: str) -> torch.Tensor:
        """Entries ``[start, stop)`` (1-D, stored dtype), valid until the next read into the
        same ``slot`` on this thread."""
        ...

    def read_strided(self, stride: int, slot: str) -> torch.Tensor:
        """The entries at flat indexes 0, stride, 2·stride, ... (1-D, stored dtype, new)."""
        ...


def numel_of(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def chunk_ranges(numel: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each chunk of ``numel`` flat entries, in order."""
    for start in range(0, numel, CHUNK):
        yield start, min(numel, start + CHUNK)


class TensorSource:
    """A tensor in memory; reads are views (no copy) of its flattened entries."""

    def __init__(self, tensor: torch.Tensor):
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self._flat = tensor.reshape(-1)  # [numel]; a copy only if not contiguous

    def read(self, start: int, stop: int, slot: str) -> torch.Tensor:
        return self._flat[start:stop]

    def read_strided(self, stride: int, slot: str) -> torch.Tensor:
        return self._flat[::stride]


class CheckpointSource:
    """Tensor ``name`` of a checkpoint; each read is one positional read into a buffer."""

    def __init__(self, checkpoint: Checkpoint, name: str):
        self.checkpoint, self.name = checkpoint, name
        self.shape = tuple(checkpoint.shape(name))
        location = checkpoint.location(name)
        self.dtype = location.dtype if location is not None else checkpoint.get(name).dtype

    def read(self, start: int, stop: int, slot: str) -> torch.Tensor:
        buffer = work_buffer(f"read:{slot}", stop - start, self.dtype)
        return self.checkpoint.read_range(self.name, start, stop, buffer)

    def read_strided(self, stride: int, slot: str) -> torch.Tensor:
        # one pass over the tensor, chunk by chunk: a read per sampled entry would be slower
        parts = []
        for start, stop in chunk_ranges(numel_of(self.shape)):
            first = -start % stride  # the chunk's first index that is a multiple of stride
            parts.append(self.read(start, stop, slot)[first::stride].clone())
        return torch.cat(parts)


_local = threading.local()


def work_buffer(name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 1-D buffer of ``numel`` entries (uninitialised), reused by later calls with the same
    ``name`` and dtype on this thread; grows when a larger one is asked for.

    Reuse matters for speed: a fresh large allocation is fresh pages from the kernel, and
    faulting them in costs about as much as the arithmetic that fills them. Each thread has its
    own buffers; they are freed when the thread ends.
    """
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = _local.__dict__.setdefault("pool", {})
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        buffers[(name, dtype)] = buffer
    return buffer[:numel]
