"""Derive a new checkpoint from an existing one with a few tensors replaced.

Shards that hold no replaced tensor are hard-linked (copied where links are impossible);
only shards holding a replaced tensor are rewritten, tensor by tensor.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mergeme.checkpoint import Checkpoint
from mergeme.io.atomic import atomic_folder
from mergeme.io.safetensors_writer import CODE_DTYPES, ShardWriter, TensorSpec


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def derive_checkpoint(
    source: Checkpoint,
    target: Path,
    replacements: dict[str, torch.Tensor],
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``target``: ``source`` with ``replacements`` (same names, dtypes and shapes).

    Raises:
        ValueError: a replacement names an unknown tensor or changes its dtype or shape.
    """
    for name, tensor in replacements.items():
        expected = (CODE_DTYPES[source.dtype_name(name)], source.shape(name))
        if (tensor.dtype, tuple(tensor.shape)) != expected:
            raise ValueError(
                f"replacement for {name!r} is {tensor.dtype} {tuple(tensor.shape)}; "
                f"the checkpoint has {expected[0]} {expected[1]}"
            )
    touched = {source.file_of(name) for name in replacements}

    with atomic_folder(Path(target), overwrite=overwrite) as folder:
        for item in source.path.iterdir():
            if item.is_file() and item not in touched:
                _link_or_copy(item, folder / item.name)
        for shard in touched:
            names = [n for n in source.tensor_names() if source.file_of(n) == shard]
            specs = [
                TensorSpec(n, CODE_DTYPES[source.dtype_name(n)], source.shape(n)) for n in names
            ]
            writer = ShardWriter(folder / shard.name, specs, {"format": "pt"})
            for name in names:
                writer.write(name, replacements.get(name, source.get(name)))
            writer.close()
        for file_name, text in (extra_files or {}).items():
            # unlink first: writing through a hard link would change the source too
            (folder / file_name).unlink(missing_ok=True)
            (folder / file_name).write_text(text)
    return Path(target)
