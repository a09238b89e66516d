"""Dense checkpoints in the registry: how experts get a ``models:/`` URI to be fetched from."""

from __future__ import annotations

from pathlib import Path

from mergeme.checkpoint import Checkpoint
from mergeme.registry.store import (
    ensure_experiment,
    find_version_by_tag,
    log_checkpoint_model,
    register_version,
    registry_errors,
)

CONTENT_HASH_TAG = "mergeme.content_hash"


def register_dense_checkpoint(
    path: Path, name: str, alias: str, experiment: str, workspace: Path
) -> tuple[str, bool]:
    """Register ``path`` as a version of ``name`` unless a version with the same weights
    exists; either way point ``alias`` at it. Returns (version, whether one was created).

    Raises:
        CheckpointError: ``path`` is not a readable checkpoint.
        RegistryUnavailable: the MLflow store did not answer.
        RegistryError: the MLflow store refused a request.
    """
    import mlflow
    from mlflow import MlflowClient

    with Checkpoint(path) as checkpoint:
        content_hash = checkpoint.content_hash()
    with registry_errors(f"registering checkpoint {name}"):
        existing = find_version_by_tag(name, CONTENT_HASH_TAG, content_hash)
        if existing is not None:
            MlflowClient().set_registered_model_alias(name, alias, existing)
            return existing, False
        with mlflow.start_run(experiment_id=ensure_experiment(experiment, workspace)) as run:
            mlflow.set_tag(CONTENT_HASH_TAG, content_hash)
            info = log_checkpoint_model(path)
        tags = {CONTENT_HASH_TAG: content_hash, "mergeme.source_path": str(Path(path).resolve())}
        return register_version(name, info.model_uri, run.info.run_id, tags, alias), True
