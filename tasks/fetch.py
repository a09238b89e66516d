from pathlib import Path

from prefect import task

from mergeme.config import PipelineConfig
from mergeme.pipeline import fetch_step


@task(name="fetch experts", retries=2, retry_delay_seconds=[2, 10])
def fetch_experts(config: PipelineConfig, workspace: Path) -> list[dict]:
    """Resolve the base and every expert to local folders; retried, as sources may be remote."""
    return fetch_step(config, workspace)
