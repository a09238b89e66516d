from pathlib import Path

from prefect import task

from mergeme.pipeline import validate_step


@task(name="validate checkpoints")
def validate_checkpoints(fetched: list[dict], report_dir: Path) -> dict:
    """Stop the flow before the merge if any checkpoint is unusable."""
    return validate_step(fetched, report_dir)
