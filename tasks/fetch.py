from pathlib import Path

from prefect import task

from mergeme.config import PipelineConfig
from mergeme.pipeline import fetch_step
from tasks.retry import RETRY_DELAYS, RETRY_JITTER, is_transient


@task(
    name="fetch experts",
    retries=len(RETRY_DELAYS),
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=is_transient,
)
def fetch_experts(config: PipelineConfig, workspace: Path) -> list[dict]:
    """Resolve the base and every expert to local folders; retried, as sources may be remote."""
    return fetch_step(config, workspace)
