"""Lazy, read-only access to a Hugging Face checkpoint folder of safetensors files.

Tensors are memory-mapped and read one at a time, so a merge never holds a whole model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from mergeme.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def hash_weight_files(folder: Path) -> str:
    """sha256 over the names and bytes of every weight file in ``folder`` (sorted by name).

    Raises:
        CheckpointError: the folder holds no weight file.
    """
    files = sorted({file for pattern in WEIGHT_PATTERNS for file in Path(folder).glob(pattern)})
    if not files:
        raise CheckpointError(f"{folder} holds no weight files (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Checkpoint:
    """One checkpoint folder: its ``config.json`` and its safetensors weights.

    Raises:
        CheckpointError: the folder, its config or its weight files are missing or unreadable.
    """

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name
        if not self.path.is_dir():
            raise CheckpointError(f"{self.name}: checkpoint folder {self.path} does not exist")
        self.config = self._read_config()
        self._tensor_files = self._map_tensors_to_files()
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

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
        raise CheckpointError(
            f"{self.name}: no {SINGLE_FILE} or {SAFETENSORS_INDEX} in {self.path}; "
            "save the model with safetensors (save_pretrained does by default)"
        )

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

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped; the copy happens on first use)."""
        return self._handle(self.file_of(name)).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of(name)).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._handle(self.file_of(name)).get_slice(name).get_dtype()

    def weight_files(self) -> list[Path]:
        return sorted(set(self._tensor_files.values()))

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names():
            yield name, self.get(name)

    def content_hash(self) -> str:
        """sha256 over the weight files' names and bytes: the identity of the weights."""
        return hash_weight_files(self.path)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

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
