"""Fetch step: resolve each configured source to a local checkpoint folder, pinned.

Sources: a local folder; a Hugging Face repo at a revision (through ``huggingface_hub``,
offline against its cache by default); a registered MLflow model by version or alias.
Every fetched checkpoint records what it resolved to, a content hash over its weights,
config and tokenizer files (what later steps are keyed on), and a hash of the weights alone.
File hashes are remembered in the workspace (:mod:`mergeme.file_hashes`), so an unchanged
checkpoint is not read again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mergeme.checkpoint import hash_checkpoint, hash_weight_files
from mergeme.config import HuggingFaceSource, LocalSource, MlflowSource
from mergeme.errors import CheckpointError, SourceError
from mergeme.file_hashes import FileHashCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchedCheckpoint:
    """A checkpoint on local disk and where it came from."""

    name: str
    role: str  # "base" or "expert"
    domain: str | None
    path: str
    source: str  # the configured source, as text
    resolved: str  # commit hash, registry version, or "local"
    content_hash: str  # weights, config, generation config, tokenizer
    weights_hash: str  # the weight files alone


def _fetch_huggingface(source: HuggingFaceSource) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    try:
        folder = snapshot_download(
            source.repo_id,
            revision=source.revision,
            cache_dir=str(source.cache_dir) if source.cache_dir else None,
            local_files_only=source.offline,
        )
    except (LocalEntryNotFoundError, RevisionNotFoundError, FileNotFoundError) as exc:
        where = source.cache_dir or "the default Hugging Face cache"
        raise SourceError(
            f"huggingface {source.repo_id}@{source.revision}: not available offline in {where} "
            f"({type(exc).__name__}); download it there first or set offline: false"
        ) from exc
    # the snapshot folder is named after the resolved commit
    return Path(folder), Path(folder).name


def _fetch_mlflow(source: MlflowSource, name: str, workspace: Path) -> tuple[Path, str]:
    from mergeme.registry.store import download_checkpoint, resolve_model_uri

    resolved = resolve_model_uri(source.uri)
    destination = workspace / "fetched" / resolved.name / resolved.version
    marker = destination / ".complete"
    if marker.is_file():
        folder = Path(marker.read_text())
    else:
        folder = download_checkpoint(resolved, destination)
        marker.write_text(str(folder))
    return folder, f"{resolved.name}/{resolved.version}"


def describe(source: LocalSource | HuggingFaceSource | MlflowSource) -> str:
    if isinstance(source, LocalSource):
        return f"local:{source.path}"
    if isinstance(source, HuggingFaceSource):
        return f"huggingface:{source.repo_id}@{source.revision}"
    return source.uri


def fetch_checkpoint(
    name: str,
    role: str,
    domain: str | None,
    source: LocalSource | HuggingFaceSource | MlflowSource,
    workspace: Path,
    hashes: FileHashCache | None = None,
) -> FetchedCheckpoint:
    """Resolve ``source`` to a local folder and hash its files (through ``hashes``, which
    remembers unchanged files; the caller saves it).

    Raises:
        SourceError: the source cannot be found or holds no weights.
    """
    if isinstance(source, LocalSource):
        if not Path(source.path).is_dir():
            raise SourceError(f"{role} {name!r}: local folder {source.path} does not exist")
        folder, resolved = Path(source.path), "local"
    elif isinstance(source, HuggingFaceSource):
        folder, resolved = _fetch_huggingface(source)
    else:
        folder, resolved = _fetch_mlflow(source, name, workspace)
    digest = (hashes or FileHashCache()).digest
    try:
        content_hash = hash_checkpoint(folder, digest)
        weights_hash = hash_weight_files(folder, digest)
    except CheckpointError as exc:
        raise SourceError(f"{role} {name!r} ({describe(source)}): {exc}") from exc
    logger.info("fetched %s %s from %s (%s)", role, name, describe(source), resolved)
    return FetchedCheckpoint(
        name, role, domain, str(folder), describe(source), resolved, content_hash, weights_hash
    )
