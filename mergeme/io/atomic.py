"""Folders that appear only when complete.

Work happens in a hidden temporary sibling of the target (``.NAME.partial-PID-RANDOM``); only a
successful exit renames it into place, so a crash or Ctrl-C never leaves a folder that looks
like a finished output. A process killed outright (SIGKILL, power loss) cannot clean up after
itself: the next write of the same target removes the siblings whose process is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` when the block succeeds.

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is false.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; remove it, choose another output folder, or overwrite"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    partial = target.parent / f".{target.name}.partial-{_owner_tag()}"
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        # KeyboardInterrupt included: nothing half-written may survive
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        retired = target.parent / f".{target.name}.retired-{_owner_tag()}"
        target.rename(retired)
        partial.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        partial.rename(target)
    logger.debug("wrote %s", target)


def _owner_tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_is_gone(tag: str) -> bool:
    # tags are PID-RANDOM; a tag without a PID predates them and has no owner to wait for
    pid = tag.split("-", 1)[0]
    if not pid.isdigit() or "-" not in tag:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def remove_stale_siblings(target: Path) -> list[Path]:
    """Delete the half-written (``.partial-``) and half-replaced (``.retired-``) siblings of
    ``target`` whose writing process no longer runs; returns what was removed. Siblings of a
    running process, this one included, are left alone."""
    removed = []
    for kind in ("partial", "retired"):
        for stale in Path(target).parent.glob(f".{Path(target).name}.{kind}-*"):
            if _process_is_gone(stale.name.rsplit(f".{kind}-", 1)[1]):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    if removed:
        logger.warning(
            "removed %d half-written folders of %s left by a killed run", len(removed), target
        )
    return removed
