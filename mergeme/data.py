"""Calibration and evaluation texts: ``<root>/<domain>/<split>.jsonl`` read with ``datasets``,
and the DVC md5s that identify them."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from mergeme.errors import DataError

logger = logging.getLogger(__name__)


def split_path(root: Path, domain: str, split: str) -> Path:
    return Path(root) / domain / f"{split}.jsonl"


def load_texts(
    root: Path, domain: str, split: str, cache_dir: Path, limit: int | None = None
) -> list[str]:
    """The ``text`` column of one domain's split, in file order (first ``limit`` rows).

    Raises:
        DataError: the file is missing, has no ``text`` column, or is empty.
    """
    import datasets

    path = split_path(root, domain, split)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: the {split} split of domain {domain!r} is needed; "
            "run `dvc repro data` or fix data.root in the config"
        )
    datasets.disable_progress_bars()
    table = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(cache_dir)
    )
    if "text" not in table.column_names:
        raise DataError(f"{path}: rows have no 'text' field (columns: {table.column_names})")
    texts = list(table["text"][: limit or len(table)])
    if not texts:
        raise DataError(f"{path} has no rows; the {split} split of {domain!r} must not be empty")
    return texts


def dvc_output_md5s(dvc_lock: Path, stage: str) -> dict[str, str]:
    """``{output path: md5}`` of one stage as recorded in ``dvc.lock``.

    Raises:
        DataError: the lock file or the stage is missing.
    """
    if not Path(dvc_lock).is_file():
        raise DataError(f"{dvc_lock} does not exist; run `dvc repro` and commit dvc.lock")
    lock = yaml.safe_load(Path(dvc_lock).read_text()) or {}
    try:
        outs = lock["stages"][stage]["outs"]
    except (KeyError, TypeError):
        raise DataError(f"{dvc_lock} has no stage {stage!r}; run `dvc repro {stage}`") from None
    return {out["path"]: out["md5"] for out in outs}
