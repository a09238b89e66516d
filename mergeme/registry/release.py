"""Register step: one MLflow run per pipeline run, and the MoE as a new registered version.

Everything is logged into the run before the version is created; the version is created with
all its lineage tags in one call; the alias and the run tag ``mergeme.registered_version``
come last. If the alias fails in-process, the version is deleted again. A process killed
after the version exists leaves a release whose run lacks that tag: the next run with the
same inputs finishes it (see ``release_lineage.existing_release``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergeme.registry.lineage_run import DataInput, StepRecord, log_data_inputs, log_step_runs
from mergeme.registry.model_card import CARD_FILE, render_model_card
from mergeme.registry.redact import redact_mapping
from mergeme.registry.store import ensure_experiment, log_checkpoint_model, register_version

logger = logging.getLogger(__name__)

REGISTERED_TAG = "mergeme.registered_version"


@dataclass(frozen=True)
class Release:
    model_name: str
    version: str
    alias: str | None
    run_id: str
    model_uri: str


def flatten(prefix: str, value: object) -> dict[str, str]:
    """Nested dicts as dotted MLflow param keys."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return flat
    return {prefix: str(value)}


def register_release(
    *,
    workspace: Path,
    experiment: str,
    model_name: str,
    alias: str | None,
    checkpoint: Path,
    params: dict,
    metrics: dict[str, float],
    artifacts: list[Path],
    tags: dict[str, str],
    run_name: str | None = None,
    steps: dict[str, StepRecord] | None = None,
    data: list[DataInput] | None = None,
    log_more: Callable[[str], None] | None = None,
) -> Release:
    """Log a run (params, metrics, artifacts, tags), a nested run per pipeline step in
    ``steps`` and the ``data`` splits as dataset inputs; ``log_more(run_id)`` adds anything
    else (e.g. metric histories) before the model is registered; register ``checkpoint``
    (with a model card inside the model) as a new version of ``model_name`` tagged with
    ``tags``; point ``alias`` at it.

    Raises:
        MlflowException: the store refused or did not answer (the caller names it).
    """
    import mlflow
    from mlflow import MlflowClient

    # secrets never reach the store: not in params, run tags or version tags
    params, tags = redact_mapping(flatten("", params)), redact_mapping(tags)
    experiment_id = ensure_experiment(experiment, workspace)
    # the tags (with the input fingerprint) from the start: an interrupted run is findable
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for artifact in artifacts:
            if artifact.is_dir():
                mlflow.log_artifacts(str(artifact), artifact_path=artifact.name)
            else:
                mlflow.log_artifact(str(artifact))
        log_data_inputs(data or [])
        log_step_runs(steps or {}, run.info.run_id)
        if log_more is not None:
            log_more(run.info.run_id)
        card = render_model_card(model_name, tags, metrics)
        mlflow.log_text(card, CARD_FILE)
        card_file = workspace / "model_cards" / run.info.run_id / CARD_FILE
        card_file.parent.mkdir(parents=True, exist_ok=True)
        card_file.write_text(card)
        info = log_checkpoint_model(checkpoint, extra_artifacts={"model_card": card_file})
        version = register_version(model_name, info.model_uri, run.info.run_id, tags, None)
        try:
            if alias:
                MlflowClient().set_registered_model_alias(model_name, alias, version)
            mlflow.set_tag(REGISTERED_TAG, f"{model_name}/{version}")
        except BaseException:
            MlflowClient().delete_model_version(model_name, version)
            raise
    logger.info("registered %s version %s (alias %s)", model_name, version, alias)
    return Release(model_name, version, alias, run.info.run_id, info.model_uri)
