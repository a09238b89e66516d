from pathlib import Path

from prefect import task

from mergeme.versioning import clean_stale_partials


@task(name="clean workspace")
def clean_workspace(workspace: Path) -> list[str]:
    """Remove half-written folders a killed run left behind; returns their paths."""
    return [str(path) for path in clean_stale_partials(workspace)]
