"""Do the data files match the md5s that ``dvc.lock`` recorded for them?

The verdict comes from DVC itself (``Repo.status``). To name the files that changed, each
file's md5 is compared with the directory listing DVC keeps in its cache; ``dvc_dir_md5``
recomputes DVC's directory hash (the md5 of that listing as sorted JSON) for parity checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mergeme.data import dvc_output_md5s
from mergeme.errors import DataError
from mergeme.validation.problems import Problem

logger = logging.getLogger(__name__)


def dvc_dir_entries(folder: Path) -> list[dict[str, str]]:
    """``[{"md5", "relpath"}]`` of every file under ``folder``, sorted by relative path, as DVC
    lists a directory output."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = [
        {
            "md5": hashlib.md5(p.read_bytes()).hexdigest(),
            "relpath": p.relative_to(folder).as_posix(),
        }
        for p in files
    ]
    return sorted(entries, key=lambda entry: entry["relpath"])


def dvc_dir_md5(folder: Path) -> str:
    """DVC's md5 of a directory output (``<hex>.dir``, as written in ``dvc.lock``)."""
    listing = json.dumps(dvc_dir_entries(folder), sort_keys=True)
    return hashlib.md5(listing.encode("utf-8")).hexdigest() + ".dir"


def _local_md5(path: Path) -> str | None:
    """DVC's md5 of a file or directory output as it is now; None when it does not exist."""
    if path.is_dir():
        return dvc_dir_md5(path)
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None


def _changed_files(repo, out_path: Path, md5: str) -> list[str]:
    """Files under ``out_path`` added, removed or modified since the lock (empty when DVC's
    cache holds no listing to compare with)."""
    listing_path = Path(repo.cache.local.oid_to_path(md5.removesuffix(".dir") + ".dir"))
    if not md5.endswith(".dir") or not listing_path.is_file() or not out_path.is_dir():
        return []
    recorded = {e["relpath"]: e["md5"] for e in json.loads(listing_path.read_text())}
    current = {e["relpath"]: e["md5"] for e in dvc_dir_entries(out_path)}
    return sorted(n for n in set(recorded) | set(current) if recorded.get(n) != current.get(n))


def untracked_problem(
    data_root: Path, dvc_lock: Path, stage: str, recorded: dict[str, str]
) -> Problem | None:
    """``data_untracked`` when ``data_root`` lies inside none of ``stage``'s outputs: the md5s
    in ``dvc_lock`` then say nothing about the files the pipeline would read."""
    root = Path(dvc_lock).resolve().parent
    data = Path(data_root).resolve()
    if any(data.is_relative_to((root / out).resolve()) for out in recorded):
        return None
    outputs = ", ".join(str(root / out) for out in sorted(recorded)) or "none"
    return Problem(
        "data_untracked",
        f"data.root {data} is not inside any output of stage {stage!r} in {dvc_lock} (outputs: "
        f"{outputs}), so its md5s do not identify this data. Point data.root at that stage's "
        "output, or data.dvc_lock (and data.dvc_stage) at the lock of the stage that wrote it",
    )


def _changed_outputs(repo, root: Path, stage: str, recorded: dict[str, str]) -> dict[str, str]:
    """``{output: state}`` of every output of ``stage`` that differs from the lock."""
    # a bare stage name would be looked up from the current directory, not the repo's
    status = repo.status(targets=[f"{root / 'dvc.yaml'}:{stage}"])
    changed: dict[str, str] = {}
    for entries in status.values():
        for entry in entries:
            if isinstance(entry, dict):
                changed.update(entry.get("changed outs", {}))
    # "not in cache" hides whether the files changed (DVC compares nothing without its cache
    # copy): recompute the md5 DVC's way and compare with the lock ourselves
    for out, state in list(changed.items()):
        if state == "not in cache":
            if _local_md5(root / out) == recorded.get(out):
                del changed[out]
            else:
                changed[out] = "modified"
    return changed


def _dvc_problem(dvc_lock: Path, stage: str, error: Exception) -> Problem:
    from dvc.exceptions import NotDvcRepoError

    root = Path(dvc_lock).resolve().parent
    if isinstance(error, NotDvcRepoError):
        message = (
            f"{dvc_lock} is not in a DVC repository ({root} has no .dvc folder), so DVC cannot "
            f"check the data against it. Run `dvc init` and `dvc repro {stage}` there, or point "
            "data.dvc_lock at the dvc.lock of the repository that produced the data"
        )
    else:
        message = (
            f"DVC could not check stage {stage!r} of {dvc_lock} ({error}); fix dvc.yaml and "
            f"dvc.lock in {root} (`dvc repro {stage}`) or data.dvc_stage"
        )
    return Problem("data_lock_unusable", message)


def uncommitted_data_problems(
    dvc_lock: Path, stage: str, allow_uncommitted: bool, data_root: Path | None = None
) -> list[Problem]:
    """A ``data_uncommitted`` problem per output of ``stage`` that differs from ``dvc.lock``
    (a warning instead when ``allow_uncommitted``); ``data_missing`` when the lock or the stage
    is missing; ``data_untracked`` when ``data_root`` is given and lies outside the stage's
    outputs; ``data_lock_unusable`` when DVC cannot read the repository of the lock."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        recorded = dvc_output_md5s(Path(dvc_lock), stage)
    except DataError as exc:
        return [Problem("data_missing", str(exc))]
    untracked = untracked_problem(data_root, dvc_lock, stage, recorded) if data_root else None
    tracking = [untracked] if untracked else []
    root = Path(dvc_lock).resolve().parent
    try:
        with Repo(str(root)) as repo:
            changed = _changed_outputs(repo, root, stage, recorded)
            listed = {
                out: _changed_files(repo, root / out, recorded.get(out, "")) for out in changed
            }
    except DvcException as exc:
        return [*tracking, _dvc_problem(dvc_lock, stage, exc)]

    problems = []
    for out, state in sorted(changed.items()):
        named = f" (files: {', '.join(listed[out])})" if listed[out] else ""
        problems.append(
            Problem(
                "data_uncommitted",
                f"{root / out} is {state} since {dvc_lock} stage {stage!r}{named}: the data "
                f"has uncommitted changes. Run `dvc repro {stage}` (or `dvc checkout`) and "
                "commit dvc.lock, or set data.allow_uncommitted: true to accept them",
            )
        )
    if problems and allow_uncommitted:
        for problem in problems:
            logger.warning("accepted by data.allow_uncommitted: %s", problem.message)
        problems = []
    return [*tracking, *problems]
