"""Scheduled retraining: the ``retrain`` deployment of the pipeline, read from
``infra/prefect.yaml`` (the one file that holds its cron schedule and parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergeme.config import format_validation_error
from mergeme.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREFECT_FILE = REPO_ROOT / "infra" / "prefect.yaml"
PIPELINE_ENTRYPOINT = "flows/pipeline.py:merge_pipeline"


class CronSchedule(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    cron: str = Field(pattern=r"^\S+( \S+){4}$", description="Five-field cron expression.")
    timezone: str = "UTC"
    active: bool = True


class PipelineParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    config_path: str
    workspace: str | None = None


class DeploymentSettings(BaseModel):
    """One deployment entry of a ``prefect.yaml`` (the keys mergeme uses)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    entrypoint: str
    parameters: PipelineParameters
    schedules: list[CronSchedule] = Field(min_length=1)
    tags: list[str] = []


def load_deployment(prefect_file: Path, name: str = "retrain") -> DeploymentSettings:
    """The deployment ``name`` of ``prefect_file``, with relative parameter paths made
    absolute against the repository root.

    Raises:
        ConfigError: the file or deployment is missing, it does not run the pipeline, or its
            keys are invalid.
    """
    path = Path(prefect_file)
    if not path.is_file():
        raise ConfigError(f"deployment file {path} does not exist")
    entries = (yaml.safe_load(path.read_text()) or {}).get("deployments") or []
    found = [entry for entry in entries if entry.get("name") == name]
    if not found:
        names = [entry.get("name") for entry in entries]
        raise ConfigError(f"{path}: no deployment named {name!r} (found {names})")
    try:
        settings = DeploymentSettings.model_validate(found[0])
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{path} deployment {name}")) from exc
    if settings.entrypoint != PIPELINE_ENTRYPOINT:
        raise ConfigError(
            f"{path} deployment {name}: entrypoint {settings.entrypoint} is not the pipeline "
            f"({PIPELINE_ENTRYPOINT})"
        )
    return settings.model_copy(update={"parameters": _absolute(settings.parameters)})


def _absolute(parameters: PipelineParameters) -> PipelineParameters:
    def resolve(value: str | None) -> str | None:
        return None if value is None else str((REPO_ROOT / value).resolve())

    return PipelineParameters(
        config_path=resolve(parameters.config_path), workspace=resolve(parameters.workspace)
    )


def to_deployment(settings: DeploymentSettings) -> Any:
    """The pipeline as a Prefect ``RunnerDeployment`` with the settings' schedules."""
    from prefect.schedules import Cron

    from flows.pipeline import merge_pipeline

    schedules = [
        Cron(item.cron, timezone=item.timezone, active=item.active) for item in settings.schedules
    ]
    return merge_pipeline.to_deployment(
        name=settings.name,
        schedules=schedules,
        parameters=settings.parameters.model_dump(),
        tags=settings.tags,
    )


def serve_pipeline(settings: DeploymentSettings) -> None:
    """Serve the deployment in this process until interrupted (its schedule pauses then)."""
    from prefect import serve

    serve(to_deployment(settings))
