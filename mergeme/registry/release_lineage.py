"""What the register step adds to a release beyond the step outputs: the input fingerprint
that makes re-runs idempotent, the code and deployment facts, and the data inputs."""

from __future__ import annotations

import json
import logging

from mergeme import versioning
from mergeme.config import PipelineConfig
from mergeme.errors import RegistryUnavailable
from mergeme.registry.lineage_run import DataInput, data_inputs
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


def release_data(config: PipelineConfig) -> list[DataInput]:
    """The calibration and eval splits as dataset inputs, with their DVC md5."""
    from mergeme.pipeline import data_md5

    splits = (config.data.calibration_split, config.data.eval_split)
    return data_inputs(
        config, data_md5(config), {s: versioning.split_md5s(config, s) for s in splits}
    )


def existing_release(config: PipelineConfig, calibrated: dict, fetched: list[dict]) -> dict | None:
    """The release already registered from exactly these inputs, if any, as the register
    step's output with ``created: False``.

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
        message = str(exc).splitlines()[0][:300]
        raise RegistryUnavailable(
            f"the MLflow registry at {client._registry_uri} did not answer ({message}); "
            "check that the tracking server runs, or fix registry.tracking_uri in the config"
        ) from exc
    if not found:
        return None
    version = max(found, key=lambda v: int(v.version))
    logger.info(
        "inputs unchanged: %s version %s was registered from the same inputs; "
        "registering nothing new",
        name,
        version.version,
    )
    return {
        "model_name": name,
        "version": str(version.version),
        "alias": None,
        "run_id": version.run_id,
        "model_uri": version.source,
        "tags": dict(version.tags),
        "created": False,
    }
