from pathlib import Path

from prefect import task

from mergeme.config import PipelineConfig
from mergeme.pipeline import calibrate_step
from tasks import caching


@task(name="route-calibrate", cache_key_fn=caching.calibrate_key, persist_result=True)
def calibrate_routes(
    config: PipelineConfig, merged: dict, workspace: Path, fetched: list[dict] | None = None
) -> dict:
    """Set the MoE's routers from the calibration split (``fetched``: the dense experts, for
    the router methods that need them)."""
    return calibrate_step(config, merged, workspace, fetched)
