"""Streaming writer of sharded safetensors checkpoints.

The layout of every shard (names, dtypes, shapes, offsets) is planned from tensor metadata
before any data is read, so each shard's header is written first and tensors are then
streamed to their offsets one at a time: memory holds one tensor, never a whole shard.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mergeme.checkpoint import TensorLocation

COPY_CHUNK = 64 * 1024**2

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What will be written under ``name``: its dtype and shape, known before its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into shards of at most ``max_shard_size`` bytes (a single
    larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Writes one safetensors file whose tensors arrive one by one, in any order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]):
        self.path = path
        self._specs = {spec.name: spec for spec in specs}
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        self._offsets: dict[str, int] = {}
        for spec in specs:
            self._offsets[spec.name] = offset
            header[spec.name] = {
                "dtype": DTYPE_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        self._data_start = 8 + len(encoded)
        self._pending = set(self._specs)
        # a raw descriptor: tensors land at their offsets with pwrite / copy_file_range
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite(struct.pack("<Q", len(encoded)) + encoded, 0)
        os.ftruncate(self._fd, self._data_start + offset)

    def _pwrite(self, data: memoryview | bytes, position: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, position)
            view, position = view[written:], position + written

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but was planned as "
                f"{spec.dtype} {spec.shape}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._pwrite(memoryview(data), self._data_start + self._offsets[name])
        self._pending.discard(name)

    def copy(self, name: str, source: TensorLocation) -> None:
        """Copy a tensor's bytes straight from another safetensors file (same dtype and
        shape as planned), without passing them through Python."""
        spec = self._specs[name]
        if source.length != spec.nbytes or source.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r}: {source.length} bytes of {source.dtype} in {source.file} do "
                f"not match the planned {spec.nbytes} bytes of {spec.dtype}"
            )
        target = self._data_start + self._offsets[name]
        with open(source.file, "rb") as stream:
            position, end = source.offset, source.offset + source.length
            while position < end:
                count = min(COPY_CHUNK, end - position)
                try:
                    copied = os.copy_file_range(stream.fileno(), self._fd, count, position, target)
                except OSError:  # e.g. across file systems on old kernels: copy through memory
                    copied = os.pwrite(self._fd, os.pread(stream.fileno(), count, position), target)
                if copied == 0:
                    raise ValueError(f"{source.file} ended before tensor {name!r} was copied")
                position, target = position + copied, target + copied
        self._pending.discard(name)

    def abort(self) -> None:
        os.close(self._fd)

    def close(self) -> None:
        """Close the file; raises ValueError if a planned tensor was never written."""
        os.close(self._fd)
        if self._pending:
            raise ValueError(f"{self.path}: tensors never written: {sorted(self._pending)[:5]}")


class CheckpointWriter:
    """Writes the planned tensors of one checkpoint into sharded safetensors plus an index."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_size: int):
        self.folder = folder
        shards = plan_shards(specs, max_shard_size)
        names = shard_file_names(len(shards))
        self.weight_map = {spec.name: file for file, shard in zip(names, shards) for spec in shard}
        self.total_size = sum(spec.nbytes for spec in specs)
        self._writers = {
            file: ShardWriter(folder / file, shard, {"format": "pt"})
            for file, shard in zip(names, shards)
        }

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writers[self.weight_map[name]].write(name, tensor)

    def copy(self, name: str, source: TensorLocation) -> None:
        self._writers[self.weight_map[name]].copy(name, source)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        if len(self._writers) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()
