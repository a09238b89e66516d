"""Lineage: the facts that say what produced a release, as flat MLflow tags."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from mergeme.registry.redact import redact_mapping


def _git(folder: Path, *args: str) -> str:
    """What ``git ARGS`` prints in ``folder``, stripped.

    Raises:
        OSError: git is not installed.
        subprocess.CalledProcessError: git failed (e.g. ``folder`` is not in a repository).
    """
    command = ["git", *args]
    return subprocess.run(
        command, cwd=folder, capture_output=True, text=True, check=True
    ).stdout.strip()


def git_revision(folder: Path) -> str:
    """The commit checked out in ``folder`` (``+dirty`` if it has uncommitted changes), or
    ``unknown`` outside a git repository."""
    try:
        commit = _git(folder, "rev-parse", "HEAD")
        dirty = _git(folder, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def _package_version() -> str:
    import mergeme

    return mergeme.__version__


def package_revision() -> str:
    """The commit of the git checkout that holds the running mergeme package (``+dirty`` with
    uncommitted changes), or ``unknown`` when the package is not in a checkout of its own
    (installed from a wheel, or inside some other repository)."""
    import mergeme

    root = Path(mergeme.__file__).resolve().parent.parent
    try:
        toplevel = _git(root, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return git_revision(root) if Path(toplevel).resolve() == root else "unknown"


def lineage_tags(
    fetched: list[dict],
    merge: dict,
    router: dict,
    data_md5: dict[str, str],
    code_revision: str,
    flow_run_id: str | None,
) -> dict[str, str]:
    """Flat ``mergeme.*`` tags from the pipeline's step outputs."""
    tags = {
        "mergeme.trunk_method": merge["trunk_method"],
        "mergeme.trunk_parameters": json.dumps(merge["trunk_parameters"], sort_keys=True),
        "mergeme.architecture": merge["architecture"],
        "mergeme.experts_per_token": str(merge["experts_per_token"]),
        "mergeme.router_method": router["method"],
        "mergeme.router_settings": json.dumps(router["settings"], sort_keys=True),
        "mergeme.data_md5": json.dumps(data_md5, sort_keys=True),
        "mergeme.code_revision": code_revision,
        "mergeme.package_version": _package_version(),
        "mergeme.prefect_flow_run_id": flow_run_id or "none",
        "mergeme.experts": ",".join(item["name"] for item in fetched if item["role"] == "expert"),
    }
    for item in fetched:
        prefix = f"mergeme.{item['role']}.{item['name']}"
        tags[f"{prefix}.source"] = item["source"]
        tags[f"{prefix}.resolved"] = item["resolved"]
        tags[f"{prefix}.content_hash"] = item["content_hash"]
        if item.get("weights_hash"):
            tags[f"{prefix}.weights_hash"] = item["weights_hash"]
        if item.get("domain"):
            tags[f"{prefix}.domain"] = item["domain"]
    # a source or resolved URI may carry credentials (https://user:token@host/...)
    return redact_mapping(tags)
