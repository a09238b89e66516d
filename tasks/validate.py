from pathlib import Path

from prefect import task

from mergeme.pipeline import validate_step
from tasks import caching


@task(name="validate checkpoints", cache_key_fn=caching.validate_key, persist_result=True)
def validate_checkpoints(
    fetched: list[dict], report_dir: Path, workspace: Path | None = None
) -> dict:
    """Stop the flow before the merge if any checkpoint is unusable (``workspace`` only
    scopes the cache key)."""
    return validate_step(fetched, report_dir)
