"""Prefect cache keys of the pipeline's tasks, from the content fingerprints in
``mergeme.versioning``.

A key also names the workspace, since a cached result points at folders inside it. Results
are persisted to ``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` (set inside the workspace by
``mergeme.workspace.configure_environment``), so the cache outlives the process: a re-run,
or a run started again after a crash, reuses every step whose key is unchanged.
``PREFECT_TASKS_REFRESH_CACHE=true`` forces every step to run again.
"""

from __future__ import annotations

from typing import Any

from mergeme import versioning


def _key(step: str, fingerprint: str, parameters: dict[str, Any]) -> str:
    return f"mergeme-{step}-{fingerprint}-{versioning.digest(str(parameters['workspace']))}"


def validate_key(context: Any, parameters: dict[str, Any]) -> str:
    fingerprint = versioning.validate_fingerprint(parameters["fetched"], parameters.get("config"))
    return _key("validate", fingerprint, parameters)


def merge_key(context: Any, parameters: dict[str, Any]) -> str:
    fingerprint = versioning.merge_fingerprint(parameters["config"], parameters["fetched"])
    return _key("merge", fingerprint, parameters)


def calibrate_key(context: Any, parameters: dict[str, Any]) -> str:
    fingerprint = versioning.calibrate_fingerprint(parameters["config"], parameters["merged"])
    return _key("calibrate", fingerprint, parameters)


def evaluate_key(context: Any, parameters: dict[str, Any]) -> str:
    config, calibrated, fetched = (parameters[k] for k in ("config", "calibrated", "fetched"))
    return _key(
        "evaluate", versioning.evaluate_fingerprint(config, calibrated, fetched), parameters
    )
