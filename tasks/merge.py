from pathlib import Path

from prefect import task

from mergeme.config import PipelineConfig
from mergeme.pipeline import merge_step
from tasks import caching


@task(name="merge", cache_key_fn=caching.merge_key, persist_result=True)
def merge_experts(config: PipelineConfig, fetched: list[dict], workspace: Path) -> dict:
    """Build the MoE checkpoint from the validated experts."""
    return merge_step(config, fetched, workspace)
