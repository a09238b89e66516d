"""What the register step adds to a release beyond the step outputs: the input fingerprint
that makes re-runs idempotent, the code and deployment facts, and the data inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mergeme import versioning
from mergeme.config import PipelineConfig
from mergeme.errors import RegistryUnavailable
from mergeme.registry.lineage_run import DataInput, data_inputs
from mergeme.registry.release import REGISTERED_TAG
from mergeme.registry.store import is_outage

logger = logging.getLogger(__name__)

FINGERPRINT_TAG = "mergeme.input_fingerprint"


def release_tags(
    config: PipelineConfig, calibrated: dict, fetched: list[dict], deployment_id: str | None
) -> dict[str, str]:
    """Tags beyond :func:`mergeme.registry.lineage.lineage_tags`: fingerprints, per-file data
    md5s, the Prefect deployment."""
    code = {step: versioning.code_version(step) for step in versioning.STEP_SOURCES}
    return {
        FINGERPRINT_TAG: versioning.release_fingerprint(config, calibrated, fetched),
        "mergeme.code_fingerprint": versioning.digest(code),
        "mergeme.calibration_md5": json.dumps(
            versioning.split_md5s(config, config.data.calibration_split), sort_keys=True
        ),
        "mergeme.eval_md5": json.dumps(
            versioning.split_md5s(config, config.data.eval_split), sort_keys=True
        ),
        "mergeme.prefect_deployment_id": deployment_id or "none",
        "mergeme.merge_seed": str(config.merge.seed),
        "mergeme.router_seed": str(config.router.seed),
    }


def dvc_data_md5s(config: PipelineConfig) -> tuple[dict[str, str], bool]:
    """``({output: md5}, uncommitted)`` of the data stage: the md5s ``dvc.lock`` records, or,
    with ``data.allow_uncommitted``, the md5s of the outputs as they are now (DVC's way) and
    whether they differ from the lock. ``({}, False)`` without a ``dvc.lock``.

    Raises:
        DataError: the lock file or the stage is missing.
    """
    from mergeme.data import dvc_output_md5s

    if config.data.dvc_lock is None:
        return {}, False
    recorded = dvc_output_md5s(config.data.dvc_lock, config.data.dvc_stage)
    if not config.data.allow_uncommitted:
        return recorded, False  # the validate step refused data that differs from the lock
    from mergeme.validation.dvc_lock import dvc_dir_md5

    root = Path(config.data.dvc_lock).resolve().parent
    actual = {
        out: dvc_dir_md5(root / out) if (root / out).is_dir() else versioning.file_md5(root / out)
        for out in recorded
    }
    return actual, actual != recorded


def release_data(
    config: PipelineConfig, dvc_md5: dict[str, str], uncommitted: bool
) -> list[DataInput]:
    """The calibration and eval splits as dataset inputs, with the data stage's DVC md5."""
    splits = (config.data.calibration_split, config.data.eval_split)
    split_md5 = {split: versioning.split_md5s(config, split) for split in splits}
    return data_inputs(config, dvc_md5, uncommitted, split_md5)


def _registry_unavailable(client, exc: Exception) -> RegistryUnavailable:
    message = str(exc).splitlines()[0][:300]
    return RegistryUnavailable(
        f"the MLflow registry at {client._registry_uri} did not answer ({message}); "
        "check that the tracking server runs, or fix registry.tracking_uri in the config"
    )


def existing_release(config: PipelineConfig, calibrated: dict, fetched: list[dict]) -> dict | None:
    """The release already registered from exactly these inputs, if any, as the register
    step's output with ``created: False``. A release whose registration was interrupted
    (killed after its version was created) is finished first: see :func:`finish_release`.

    Raises:
        RegistryUnavailable: the registry did not answer (the step is retried).
    """
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    name = config.registry.model_name
    fingerprint = versioning.release_fingerprint(config, calibrated, fetched)
    client = MlflowClient()
    try:
        found = client.search_model_versions(
            f"name='{name}' and tags.{FINGERPRINT_TAG}='{fingerprint}'"
        )
    except MlflowException as exc:
        if not is_outage(exc):
            raise
        raise _registry_unavailable(client, exc) from exc
    if not found:
        return None
    version = max(found, key=lambda v: int(v.version))
    alias = finish_release(name, str(version.version), version.run_id, config.registry.alias)
    logger.info(
        "inputs unchanged: %s version %s was registered from the same inputs; "
        "registering nothing new",
        name,
        version.version,
    )
    return {
        "model_name": name,
        "version": str(version.version),
        "alias": alias,
        "run_id": version.run_id,
        "model_uri": version.source,
        "tags": dict(version.tags),
        "created": False,
    }


def _run_or_none(client, run_id: str | None):
    """The run, or None when there is none or it was deleted for good."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if is_outage(exc):
            raise
        return None


def finish_release(name: str, version: str, run_id: str | None, alias: str | None) -> str | None:
    """Complete a release whose registration stopped after its version was created (its run
    lacks the ``mergeme.registered_version`` tag): point ``alias`` at it, tag the run and
    mark it FINISHED (everything was logged before the version existed). A complete release
    gets ``alias`` only where the model has no such alias at all.

    Returns ``alias`` if it now points at ``version``, else None.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    run = _run_or_none(client, run_id)
    marker = f"{name}/{version}"
    interrupted = run is not None and run.data.tags.get(REGISTERED_TAG) != marker
    aliases = {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}
    if alias and (interrupted or alias not in aliases):
        client.set_registered_model_alias(name, alias, version)
        aliases[alias] = version
    if interrupted:
        logger.warning("finishing %s version %s, whose registration was interrupted", name, version)
        client.set_tag(run_id, REGISTERED_TAG, marker)
        if run.info.status != "FINISHED":
            client.set_terminated(run_id, "FINISHED")
    return alias if alias and aliases.get(alias) == version else None


def close_interrupted_runs(experiment: str, fingerprint: str) -> list[str]:
    """Mark KILLED the runs (and their nested step runs) of earlier attempts to register
    ``fingerprint`` that died before creating a version and were left RUNNING; returns their
    ids. Call it only when no version with ``fingerprint`` exists."""
    import mlflow

    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    client = mlflow.MlflowClient()
    running = "attributes.status = 'RUNNING'"
    parents = client.search_runs(
        [found.experiment_id], f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and {running}"
    )
    closed = []
    for parent in parents:
        children = client.search_runs(
            [found.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and {running}",
        )
        for run in [*children, parent]:
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        logger.warning("marked %d runs of an interrupted registration KILLED", len(closed))
    return closed
