"""File integrity of a checkpoint folder, checked before any tensor is loaded.

Only metadata is read: ``config.json``, the safetensors index, and each shard's header (an
8-byte little-endian length, then that many bytes of JSON). The header must account for every
byte of the file: each tensor's byte span equals dtype size × element count, spans are
contiguous from the end of the header, and the last one ends at the end of the file. A file
shorter than its header promises is truncated; any other disagreement means the header lies.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from mergeme.validation.problems import Problem

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# bytes per element of each safetensors dtype code
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# safetensors itself refuses headers over 100 MB
MAX_HEADER_BYTES = 100 * 1024 * 1024
# problems after which the weights cannot be opened safely at all
FATAL_KINDS = frozenset(
    {
        "config_missing",
        "config_unparseable",
        "weights_missing",
        "pickle_weights",
        "shard_missing",
        "shard_truncated",
        "header_invalid",
        "index_invalid",
        "index_tensor_absent",
        "index_path_escape",
    }
)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a shard header describes it."""

    dtype: str
    shape: tuple[int, ...]
    file: Path


@dataclass
class CheckpointInventory:
    """What the metadata of one checkpoint folder says, and what is wrong with it."""

    name: str
    path: Path
    config: dict | None = None
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def readable(self) -> bool:
        """No problem keeps the weights from being opened and streamed."""
        return not any(problem.kind in FATAL_KINDS for problem in self.problems)


class _HeaderProblem(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.problem = Problem(kind, message)  # type: ignore[arg-type]


def _entry_span(file: Path, tensor: str, entry: object) -> tuple[TensorEntry, int, int]:
    """The tensor entry of one header item and its [begin, end) data offsets."""
    fix = "the file is corrupt; re-download or re-save the checkpoint"
    if not isinstance(entry, dict):
        raise _HeaderProblem(
            "header_invalid", f"{file}: header entry {tensor!r} is not a map; {fix}"
        )
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise _HeaderProblem(
            "header_invalid", f"{file}: tensor {tensor!r} has unknown dtype {dtype!r}; {fix}"
        )
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _HeaderProblem(
            "header_invalid", f"{file}: tensor {tensor!r} has malformed shape {shape!r}; {fix}"
        )
    valid = isinstance(offsets, list) and len(offsets) == 2
    if not valid or not all(isinstance(o, int) for o in offsets) or offsets[0] > offsets[1]:
        raise _HeaderProblem(
            "header_invalid", f"{file}: tensor {tensor!r} has malformed data_offsets {offsets!r}"
        )
    begin, end = offsets
    needed = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != needed:
        raise _HeaderProblem(
            "header_invalid",
            f"{file}: tensor {tensor!r} spans {end - begin} bytes, but {dtype} × {shape} needs "
            f"{needed}; the header lies about its offsets. {fix}",
        )
    return TensorEntry(dtype, tuple(shape), file), begin, end


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds, after checking that its header agrees with its
    size; reads only the header.

    Raises:
        _HeaderProblem: the file is truncated or its header is malformed or inconsistent.
    """
    size = file.stat().st_size
    with open(file, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise _HeaderProblem(
                "shard_truncated", f"{file}: {size} bytes, too short to hold a safetensors header"
            )
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(size - 8, MAX_HEADER_BYTES):
            raise _HeaderProblem(
                "shard_truncated",
                f"{file}: the header claims {header_length} bytes but the file has {size - 8} "
                "after the length; the file is truncated or not safetensors. Re-download it",
            )
        raw = stream.read(header_length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _HeaderProblem("header_invalid", f"{file}: the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _HeaderProblem("header_invalid", f"{file}: the header is not a JSON object")

    # spans, sorted by start, must tile [0, data size) with no gap and no overlap
    tensors: dict[str, TensorEntry] = {}
    spans = []
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        tensors[tensor], begin, end = _entry_span(file, tensor, entry)
        spans.append((begin, end, tensor))
    expected = 0
    for begin, end, tensor in sorted(spans):
        if begin != expected:
            raise _HeaderProblem(
                "header_invalid",
                f"{file}: tensor {tensor!r} starts at byte {begin} of the data, expected "
                f"{expected} (a gap or an overlap); the header lies about its offsets. Re-save it",
            )
        expected = end
    data_size = size - 8 - header_length
    if expected > data_size:
        raise _HeaderProblem(
            "shard_truncated",
            f"{file}: the header describes {expected} bytes of tensor data but only "
            f"{data_size} follow it; the file is truncated. Re-download or re-save it",
        )
    if expected < data_size:
        raise _HeaderProblem(
            "header_invalid",
            f"{file}: {data_size - expected} bytes after the last tensor belong to no tensor; "
            "the header lies about its offsets. Re-save the checkpoint",
        )
    return tensors


def read_checkpoint_config(inventory: CheckpointInventory, allow_remote_code: bool) -> None:
    """Read ``config.json`` into ``inventory`` (or record why not)."""
    config_path = inventory.path / "config.json"
    label = f"{inventory.name!r}"
    if not config_path.is_file():
        inventory.problems.append(
            Problem(
                "config_missing",
                f"{label}: {config_path} is missing; a checkpoint needs the config.json that "
                "save_pretrained writes",
            )
        )
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        inventory.problems.append(
            Problem(
                "config_unparseable",
                f"{label}: {config_path} is not valid JSON ({exc}); restore it from the source",
            )
        )
        return
    if not isinstance(config, dict):
        inventory.problems.append(
            Problem("config_unparseable", f"{label}: {config_path} is not a JSON object")
        )
        return
    inventory.config = config
    remote_code_problems(inventory, allow_remote_code)


def _remote_code_message(label: str, file: Path, auto_map: object, model_type: object) -> str:
    named = sorted(auto_map) if isinstance(auto_map, dict) else auto_map
    return (
        f"{label}: {file} has auto_map {named}, which names Python code shipped with the "
        "checkpoint. mergeme never runs such code (every load passes trust_remote_code=False), "
        f"so the built-in class of model_type {model_type!r} would be used instead and may not "
        "match the weights"
    )


def remote_code_problems(inventory: CheckpointInventory, allow_remote_code: bool) -> None:
    """A ``remote_code`` problem per config file of the folder (``config.json``,
    ``tokenizer_config.json``, ``generation_config.json``, ...) that has an ``auto_map``; with
    ``allow_remote_code`` a WARNING instead. An unparseable one is ``config_unparseable``."""
    label = f"{inventory.name!r}"
    model_type = (inventory.config or {}).get("model_type")
    for file in sorted(inventory.path.glob("*config*.json")):
        if file.name == "config.json":
            settings: object = inventory.config
        else:
            try:
                settings = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                message = f"{label}: {file} is not valid JSON ({exc}); restore it from the source"
                inventory.problems.append(Problem("config_unparseable", message))
                continue
        if not isinstance(settings, dict) or not settings.get("auto_map"):
            continue
        message = _remote_code_message(label, file, settings["auto_map"], model_type)
        if allow_remote_code:
            logger.warning("%s; accepted by validation.allow_remote_code", message)
            continue
        inventory.problems.append(
            Problem(
                "remote_code",
                f"{message}. Use a checkpoint of a built-in architecture, or set "
                "validation.allow_remote_code: true to accept it with a warning (the code is "
                "still never run)",
            )
        )


def _inside(folder: Path, target: Path) -> bool:
    return target.resolve().is_relative_to(folder.resolve())


def _read_index(inventory: CheckpointInventory, index_path: Path) -> None:
    label = f"{inventory.name!r}"
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise TypeError("weight_map is not a map of tensor names to file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        inventory.problems.append(
            Problem(
                "index_invalid",
                f"{label}: {index_path} is not a safetensors index with a weight_map ({exc}); "
                "re-save the checkpoint",
            )
        )
        return

    # every shard: inside the folder, present, with a consistent header
    headers: dict[str, dict[str, TensorEntry]] = {}
    for shard in sorted(set(weight_map.values())):
        target = inventory.path / shard
        if (
            Path(shard).is_absolute()
            or ".." in Path(shard).parts
            or not _inside(inventory.path, target)
        ):
            inventory.problems.append(
                Problem(
                    "index_path_escape",
                    f"{label}: {index_path} names shard {shard!r}, which lies outside "
                    f"{inventory.path}; an index may only name files inside its folder. "
                    "Do not use this checkpoint",
                )
            )
        elif not target.is_file():
            inventory.problems.append(
                Problem(
                    "shard_missing",
                    f"{label}: shard {target} named by {index_path.name} is missing; "
                    "download the complete checkpoint",
                )
            )
        else:
            headers[shard] = _read_header_into(inventory, target)

    # every tensor the index lists must be in the shard it names
    for tensor, shard in sorted(weight_map.items()):
        if shard not in headers or not headers[shard]:
            continue
        if tensor not in headers[shard]:
            inventory.problems.append(
                Problem(
                    "index_tensor_absent",
                    f"{label}: {index_path.name} puts tensor {tensor!r} in {shard}, but that "
                    "shard does not hold it; re-save the checkpoint",
                )
            )
        else:
            inventory.tensors[tensor] = headers[shard][tensor]


def _read_header_into(inventory: CheckpointInventory, file: Path) -> dict[str, TensorEntry]:
    try:
        return read_safetensors_header(file)
    except _HeaderProblem as exc:
        problem = exc.problem
        inventory.problems.append(Problem(problem.kind, f"{inventory.name!r}: {problem.message}"))
        return {}


def _read_weights(inventory: CheckpointInventory, allow_pickle: bool) -> None:
    folder, label = inventory.path, f"{inventory.name!r}"
    index_path, single = folder / SAFETENSORS_INDEX, folder / SINGLE_FILE
    if index_path.is_file():
        _read_index(inventory, index_path)
        return
    if single.is_file():
        if not _inside(folder, single):
            inventory.problems.append(
                Problem(
                    "index_path_escape",
                    f"{label}: {single} is a link to a file outside {folder}; copy the file in",
                )
            )
            return
        inventory.tensors = _read_header_into(inventory, single)
        return
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles and not allow_pickle:
        inventory.problems.append(
            Problem(
                "pickle_weights",
                f"{label}: {folder} holds only pickle weights ({', '.join(pickles)}); loading "
                "pickle can run arbitrary code. Convert them to safetensors, or set "
                "merge.allow_pickle: true if you trust their origin",
            )
        )
    elif pickles:
        logger.warning("%s: pickle weights %s allowed by merge.allow_pickle", label, pickles)
        _read_pickle_metadata(inventory)
    else:
        inventory.problems.append(
            Problem(
                "weights_missing",
                f"{label}: no {SINGLE_FILE} or {SAFETENSORS_INDEX} in {folder}; save the model "
                "with safetensors (save_pretrained does by default)",
            )
        )


def _read_pickle_metadata(inventory: CheckpointInventory) -> None:
    """Tensor names, dtypes and shapes of an allowed pickle checkpoint, loaded with
    ``weights_only`` and memory-mapped (a pickle has no header to read on its own)."""
    from mergeme.checkpoint import SAFETENSORS_DTYPES, Checkpoint
    from mergeme.errors import CheckpointError

    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    try:
        with Checkpoint(inventory.path, name=inventory.name, allow_pickle=True) as checkpoint:
            for tensor in checkpoint.tensor_names():
                value = checkpoint.get(tensor)
                inventory.tensors[tensor] = TensorEntry(
                    codes.get(value.dtype, str(value.dtype)),
                    tuple(value.shape),
                    checkpoint.file_of(tensor),
                )
    except CheckpointError as exc:
        inventory.problems.append(Problem("pickle_weights", str(exc)))


def inspect_checkpoint(
    name: str, path: Path, *, allow_pickle: bool = False, allow_remote_code: bool = False
) -> CheckpointInventory:
    """Check one checkpoint folder's config and weight files from metadata alone.

    Returns:
        The inventory: config, tensors from the headers, and every problem found (never raises
        on bad input).
    """
    inventory = CheckpointInventory(name=name, path=Path(path))
    if not inventory.path.is_dir():
        inventory.problems.append(
            Problem("weights_missing", f"{name!r}: checkpoint folder {path} does not exist")
        )
        return inventory
    read_checkpoint_config(inventory, allow_remote_code)
    _read_weights(inventory, allow_pickle)
    logger.debug("%s: %d tensors in headers", name, len(inventory.tensors))
    return inventory
