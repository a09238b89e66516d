from pathlib import Path

from prefect import task
from prefect.runtime import flow_run

from mergeme.config import PipelineConfig
from mergeme.pipeline import register_step


@task(name="register", retries=2, retry_delay_seconds=[2, 10])
def register_moe(
    config: PipelineConfig,
    config_path: Path,
    workspace: Path,
    fetched: list[dict],
    validation: dict,
    merged: dict,
    calibrated: dict,
    evaluation: dict,
) -> dict:
    """Register the MoE in MLflow with its lineage; retried, as the registry may be remote."""
    return register_step(
        config,
        config_path,
        workspace,
        fetched,
        validation,
        merged,
        calibrated,
        evaluation,
        flow_run.get_id(),
    )
