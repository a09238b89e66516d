from pathlib import Path

from prefect import task
from prefect.runtime import deployment, flow_run

from mergeme.config import PipelineConfig
from mergeme.pipeline import register_step
from tasks.retry import RETRY_DELAYS, RETRY_JITTER, is_transient


@task(
    name="register",
    retries=len(RETRY_DELAYS),
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=is_transient,
)
def register_moe(
    config: PipelineConfig,
    config_path: Path,
    workspace: Path,
    fetched: list[dict],
    validation: dict,
    merged: dict,
    calibrated: dict,
    evaluation: dict,
    pipeline_started_ms: int | None = None,
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
        deployment.get_id(),
        pipeline_started_ms,
    )
