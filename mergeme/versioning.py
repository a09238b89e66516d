"""Content fingerprints of the pipeline's steps: what decides whether a step must run again.

Each step's fingerprint covers the content of its inputs (checkpoint content hashes, the md5
of the data files it reads), its settings, and the code version (a hash of the mergeme source
files the step runs). The same fingerprint keys the step's Prefect cache entry (see
``tasks/caching.py``) and names its output folder in the workspace (merge, calibrate), so a
code change can never reuse an output built by older code. The register step tags each
release with :func:`release_fingerprint`, so an unchanged scheduled run finds the version it
would have created and registers nothing new.

Fetch has no fingerprint on purpose: it is cheap, and it must run every time to notice a
local folder whose files changed or a registry alias that moved; later steps are keyed on
the content hashes it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from functools import cache
from pathlib import Path

from mergeme.config import PipelineConfig
from mergeme.data import split_path

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent

# the source files whose change invalidates a step's cached result (pipeline.py: all of them)
STEP_SOURCES: dict[str, tuple[str, ...]] = {
    "validate": ("validation", "checkpoint.py"),
    "merge": ("merge", "io", "checkpoint.py"),
    "calibrate": ("routing", "models", "io", "checkpoint.py", "data.py", "text_batches.py"),
    "evaluate": ("evaluate.py", "models", "routing/diagnostics.py", "data.py", "text_batches.py"),
    "register": ("registry",),
}

# the workspace folders whose outputs are written through ``atomic_folder``
ATOMIC_OUTPUT_FOLDERS = ("merges", "calibrated")


def digest(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@cache
def code_version(step: str) -> str:
    """A hash of the mergeme source files that ``step`` runs (``pipeline.py`` included).

    Raises:
        KeyError: ``step`` is not one of :data:`STEP_SOURCES`.
    """
    files: list[Path] = [PACKAGE_ROOT / "pipeline.py"]
    for entry in STEP_SOURCES[step]:
        path = PACKAGE_ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    sha = hashlib.sha256()
    for file in files:
        sha.update(str(file.relative_to(PACKAGE_ROOT)).encode())
        sha.update(file.read_bytes())
    return sha.hexdigest()[:16]


def file_md5(path: Path) -> str:
    """The md5 of one file's bytes (the hash DVC uses), or ``missing``."""
    if not path.is_file():
        return "missing"
    return hashlib.md5(path.read_bytes()).hexdigest()


def split_md5s(config: PipelineConfig, split: str) -> dict[str, str]:
    """``{domain: md5}`` of each domain's file for ``split``."""
    return {
        domain: file_md5(split_path(config.data.root, domain, split)) for domain in config.domains()
    }


def _weights(fetched: list[dict]) -> list[tuple[str, str, str]]:
    return [(item["role"], item["name"], item["content_hash"]) for item in fetched]


def validate_fingerprint(fetched: list[dict], config: PipelineConfig | None = None) -> str:
    """Weights, and given ``config`` the data files, dvc.lock and the validation settings:
    validation checks all of them."""
    if config is None:
        return digest("validate", _weights(fetched), code_version("validate"))
    data = {
        split: split_md5s(config, split)
        for split in (config.data.calibration_split, config.data.eval_split)
    }
    lock = file_md5(config.data.dvc_lock) if config.data.dvc_lock else "none"
    settings = (
        config.validation.model_dump(),
        config.data.model_dump(mode="json"),
        config.merge.allow_pickle if hasattr(config.merge, "allow_pickle") else False,
    )
    return digest("validate", _weights(fetched), data, lock, settings, code_version("validate"))


def merge_fingerprint(config: PipelineConfig, fetched: list[dict]) -> str:
    """The checkpoints (weights, config and tokenizer files), the merge settings and the
    merge code; also the name of the merged checkpoint's folder."""
    return digest("merge", _weights(fetched), config.merge.model_dump(), code_version("merge"))


def calibrate_fingerprint(config: PipelineConfig, merged: dict) -> str:
    """The merged checkpoint, the router settings, the calibration split (and the fine-tune
    training split when ``finetune`` trains on its own split) and the calibrate code; also the
    name of the calibrated checkpoint's folder."""
    router = config.router
    data = {"calibration": split_md5s(config, config.data.calibration_split)}
    if router.method == "finetune" and router.finetune.split is not None:
        data["finetune"] = split_md5s(config, router.finetune.split)
    negative = router.centroid.negative_texts
    if router.centroid.negative == "texts" and negative is not None:
        # a negative text file is keyed by its content, not only by its path
        data["negative_texts"] = file_md5(Path(negative.path))
    return digest("calibrate", merged["key"], router.model_dump(), data, code_version("calibrate"))


def evaluate_fingerprint(config: PipelineConfig, calibrated: dict, fetched: list[dict]) -> str:
    evaluation = split_md5s(config, config.data.eval_split)
    return digest(
        "evaluate",
        calibrated["key"],
        _weights(fetched),
        config.evaluate.model_dump(),
        evaluation,
        code_version("evaluate"),
    )


def release_fingerprint(config: PipelineConfig, calibrated: dict, fetched: list[dict]) -> str:
    """Everything a release depends on: the evaluated model and data, the registry target
    and the register code. Equal fingerprints mean a re-run would register the same thing."""
    return digest(
        "release",
        evaluate_fingerprint(config, calibrated, fetched),
        config.registry.model_dump(),
        code_version("register"),
    )


def clean_stale_partials(workspace: Path) -> list[Path]:
    """Delete half-written output folders (``.NAME.partial-*`` / ``.NAME.retired-*``) that a
    killed run left in the workspace; returns what was removed.

    Call it only when no other pipeline run is writing into the same workspace.
    """
    removed = []
    for folder in ATOMIC_OUTPUT_FOLDERS:
        parent = Path(workspace) / folder
        if not parent.is_dir():
            continue
        for stale in [*parent.glob(".*.partial-*"), *parent.glob(".*.retired-*")]:
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    if removed:
        logger.warning("removed %d half-written folders left by an earlier run", len(removed))
    return removed
