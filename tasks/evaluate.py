from pathlib import Path

from prefect import task

from mergeme.config import PipelineConfig
from mergeme.pipeline import evaluate_step
from tasks import caching


@task(name="evaluate", cache_key_fn=caching.evaluate_key, persist_result=True)
def evaluate_models(
    config: PipelineConfig,
    calibrated: dict,
    fetched: list[dict],
    report_dir: Path,
    workspace: Path,
) -> dict:
    """Score the MoE, the base and every expert on each domain's eval split."""
    return evaluate_step(config, calibrated, fetched, report_dir, workspace)
