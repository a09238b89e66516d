from pathlib import Path

from prefect import task
from prefect.runtime import flow_run

from mergeme.config import PipelineConfig
from mergeme.pipeline import validate_step
from tasks import caching


@task(name="validate checkpoints", cache_key_fn=caching.validate_key, persist_result=True)
def validate_checkpoints(
    fetched: list[dict],
    report_dir: Path,
    config: PipelineConfig | None = None,
    workspace: Path | None = None,
) -> dict:
    """Stop the flow before the merge if any checkpoint or data file is unusable."""
    run_name = f"validation-{flow_run.get_id() or 'local'}"
    return validate_step(fetched, report_dir, config, workspace, run_name)
