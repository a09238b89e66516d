"""Lazy, read-only access to a Hugging Face checkpoint folder of safetensors files.

Tensors are memory-mapped and read one at a time, so a merge never holds a whole model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mergeme.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_FILE = "pytorch_model.bin"
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file: ``length`` bytes from ``offset``."""

    file: Path
    offset: int
    length: int
    dtype: torch.dtype


def read_safetensors_header(file: Path) -> tuple[int, dict]:
    """``(data_start, header)`` of a safetensors file: where its data section begins and its
    JSON header (tensor name → dtype, shape, data_offsets relative to ``data_start``)."""
    with open(file, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        return 8 + length, json.loads(stream.read(length))


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# the other files that decide what a checkpoint computes and how it reads text: the model
# and generation configs, the tokenizer, and custom model code a config may point at
DEFINITION_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
    "*.py",
)
FileDigest = Callable[[Path], str]


def sha256_file(file: Path) -> str:
    """The sha256 (hex) of one file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    found = {file for pattern in patterns for file in Path(folder).glob(pattern)}
    return sorted(file for file in found if file.is_file())


def _hash_listing(files: list[Path], file_digest: FileDigest) -> str:
    """sha256 over each file's name and sha256, in name order."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.name):
        digest.update(f"{file.name}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    files = _matching(folder, WEIGHT_PATTERNS)
    if not files:
        raise CheckpointError(f"{folder} holds no weight files (*.safetensors or *.bin)")
    return files


def hash_weight_files(folder: Path, file_digest: FileDigest = sha256_file) -> str:
    """The identity of the weights alone: a sha256 over the names and sha256s of the weight
    files in ``folder`` (``file_digest`` may answer from a cache).

    Raises:
        CheckpointError: the folder holds no weight file.
    """
    return _hash_listing(_weight_files(folder), file_digest)


def hash_checkpoint(folder: Path, file_digest: FileDigest = sha256_file) -> str:
    """The identity of the whole checkpoint: like :func:`hash_weight_files`, over the weight
    files and every file of :data:`DEFINITION_PATTERNS` (config, generation config,
    tokenizer, custom code), so editing any of them changes the hash.

    Raises:
        CheckpointError: the folder holds no weight file.
    """
    files = {*_weight_files(folder), *_matching(folder, DEFINITION_PATTERNS)}
    return _hash_listing(sorted(files), file_digest)


class Checkpoint:
    """One checkpoint folder: its ``config.json`` and its safetensors weights.

    Raises:
        CheckpointError: the folder, its config or its weight files are missing or unreadable.
    """

    def __init__(self, path: str | Path, name: str | None = None, allow_pickle: bool = False):
        self.path = Path(path)
        self.name = name or self.path.name
        self.allow_pickle = allow_pickle
        if not self.path.is_dir():
            raise CheckpointError(f"{self.name}: checkpoint folder {self.path} does not exist")
        self.config = self._read_config()
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._descriptors: dict[Path, int] = {}
        self._tensor_files = self._map_tensors_to_files()

    def _read_config(self) -> dict:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(
                f"{self.name}: {config_path} is missing; a checkpoint needs the config.json "
                "that save_pretrained writes"
            )
        try:
            return json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.name}: {config_path} is not valid JSON ({exc})") from exc

    def _map_tensors_to_files(self) -> dict[str, Path]:
        index_path = self.path / SAFETENSORS_INDEX
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{self.name}: {index_path} is not a safetensors index with a "
                    f"weight_map ({exc})"
                ) from exc
            return {name: self.path / shard for name, shard in weight_map.items()}
        single = self.path / SINGLE_FILE
        if single.is_file():
            with safe_open(single, "pt") as handle:
                return {name: single for name in handle.keys()}
        pickles = self._pickle_files()
        if pickles:
            return self._map_pickle_tensors(pickles)
        raise CheckpointError(
            f"{self.name}: no {SINGLE_FILE} or {SAFETENSORS_INDEX} in {self.path}; "
            "save the model with safetensors (save_pretrained does by default)"
        )

    def _pickle_files(self) -> list[Path]:
        index_path = self.path / PICKLE_INDEX
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{self.name}: {index_path} has no weight_map ({exc})"
                ) from exc
            return sorted({self.path / shard for shard in weight_map.values()})
        single = self.path / PICKLE_FILE
        return [single] if single.is_file() else []

    def _map_pickle_tensors(self, files: list[Path]) -> dict[str, Path]:
        """Load pickle shards with ``weights_only`` (no arbitrary code), memory-mapped.

        Raises:
            CheckpointError: pickles are not allowed, or a file cannot be loaded safely.
        """
        if not self.allow_pickle:
            raise CheckpointError(
                f"{self.name}: {files[0]} is a pickle checkpoint, and unpickling can run code; "
                "convert it to safetensors, or set merge.allow_pickle: true to load it with "
                "torch.load(weights_only=True)"
            )
        mapping = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
                raise CheckpointError(
                    f"{self.name}: {file} cannot be loaded with weights_only=True ({exc}); "
                    "convert it to safetensors"
                ) from exc
            self._handles[file] = state
            mapping.update({tensor: file for tensor in state})
        return mapping

    # -- reading -------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return sorted(self._tensor_files)

    def __contains__(self, name: str) -> bool:
        return name in self._tensor_files

    def file_of(self, name: str) -> Path:
        try:
            return self._tensor_files[name]
        except KeyError:
            raise CheckpointError(f"{self.name}: tensor {name!r} is not in {self.path}") from None

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, "pt"))
        return self._handles[file]

    def _is_pickle(self, file: Path) -> bool:
        return isinstance(self._handles.get(file), dict)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (one positional read; safe from any thread).

        Reading with ``pread`` rather than through a memory map keeps the process's resident
        memory at the tensors in use: pages of a map stay counted until it is closed.
        """
        file = self.file_of(name)
        if self._is_pickle(file):
            return self._handles[file][name]
        location = self.location(name)
        data = torch.empty(location.length, dtype=torch.uint8)  # [nbytes]
        self._pread_into(file, name, data, location.offset)
        return data.view(location.dtype).reshape(self.shape(name))

    def read_range(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Entries ``[start, stop)`` of the flattened tensor, read into the front of ``out``
        (a contiguous 1-D tensor of the stored dtype); returns that filled view of ``out``.

        Raises:
            CheckpointError: the file ends early or the range lies outside the tensor.
        """
        file = self.file_of(name)
        target = out[: stop - start]  # [stop - start]
        if self._is_pickle(file):
            return target.copy_(self._handles[file][name].reshape(-1)[start:stop])
        location = self.location(name)
        itemsize = target.element_size()
        if not 0 <= start <= stop or stop * itemsize > location.length:
            raise CheckpointError(
                f"{self.name}: entries [{start}, {stop}) lie outside tensor {name!r}"
            )
        self._pread_into(file, name, target.view(torch.uint8), location.offset + start * itemsize)
        return target

    def _pread_into(self, file: Path, name: str, data: torch.Tensor, offset: int) -> None:
        # data: contiguous uint8 [nbytes], filled from ``offset`` of ``file``
        view = memoryview(data.numpy())
        done = 0
        while done < len(view):
            count = os.preadv(self._descriptor(file), [view[done:]], offset + done)
            if count == 0:
                raise CheckpointError(f"{self.name}: {file} ends inside tensor {name!r}")
            done += count

    def _descriptor(self, file: Path) -> int:
        if file not in self._descriptors:
            # two threads may open it at once: keep the first descriptor, close the other
            opened = os.open(file, os.O_RDONLY)
            if self._descriptors.setdefault(file, opened) != opened:
                os.close(opened)
        return self._descriptors[file]

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.file_of(name)
        if self._is_pickle(file):
            return tuple(self._handles[file][name].shape)
        return tuple(self._header(file)[1][name]["shape"])

    def dtype_name(self, name: str) -> str:
        file = self.file_of(name)
        if self._is_pickle(file):
            dtype = self._handles[file][name].dtype
            return next(code for code, known in SAFETENSORS_DTYPES.items() if known == dtype)
        return self._handle(file).get_slice(name).get_dtype()

    def _header(self, file: Path) -> tuple[int, dict]:
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(file)
        return self._headers[file]

    def location(self, name: str) -> TensorLocation | None:
        """Where the tensor's bytes lie on disk, or None for a pickle checkpoint."""
        file = self.file_of(name)
        if self._is_pickle(file):
            return None
        data_start, header = self._header(file)
        entry = header[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.name}: tensor {name!r} in {file} has dtype {entry['dtype']}, which "
                f"mergeme does not read ({', '.join(SAFETENSORS_DTYPES)})"
            )
        begin, end = entry["data_offsets"]
        return TensorLocation(
            file, data_start + begin, end - begin, SAFETENSORS_DTYPES[entry["dtype"]]
        )

    def weight_files(self) -> list[Path]:
        return sorted(set(self._tensor_files.values()))

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names():
            yield name, self.get(name)

    def content_hash(self) -> str:
        """The identity of the checkpoint (weights, config, tokenizer): see
        :func:`hash_checkpoint`."""
        return hash_checkpoint(self.path)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compare_tensors(base: Checkpoint, other: Checkpoint) -> list[str]:
    """Every difference in tensor names or shapes between ``other`` and ``base``, as messages
    naming ``other`` and the tensor."""
    problems = []
    base_names, other_names = set(base.tensor_names()), set(other.tensor_names())
    for name in sorted(base_names - other_names):
        problems.append(f"{other.name!r}: tensor {name!r} of the base is missing")
    for name in sorted(other_names - base_names):
        problems.append(f"{other.name!r}: tensor {name!r} is not in the base")
    for name in sorted(base_names & other_names):
        if other.shape(name) != base.shape(name):
            problems.append(
                f"{other.name!r}: tensor {name!r} has shape {other.shape(name)}, "
                f"the base has {base.shape(name)}"
            )
    return problems
