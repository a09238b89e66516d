"""The ``mergeme`` command line."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mergeme.errors import MergemeError
from mergeme.workspace import configure_environment, configure_logging

if TYPE_CHECKING:
    from mergeme.checkpoint import Checkpoint
    from mergeme.config import PipelineConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
logger = logging.getLogger("mergeme")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Pipeline config (YAML).")]
WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help="Folder for everything a run writes.", show_default=False
    ),
]


def _setup(workspace: Path | None) -> Path:
    root = configure_environment(workspace, override=workspace is not None)
    configure_logging()
    return root


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def run(config: ConfigOption, workspace: WorkspaceOption = None) -> None:
    """Run the whole pipeline (a Prefect flow) and print the eval table and the release."""
    root = _setup(workspace)
    from flows.pipeline import merge_pipeline
    from mergeme.report import format_eval_table, format_release

    try:
        result = merge_pipeline(str(config.resolve()), str(root))
    except MergemeError as error:
        _fail(error)
    typer.echo(format_eval_table(result["evaluation"]))
    typer.echo(format_release(result["release"]))


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="Pipeline config (YAML).")],
    out: Annotated[Path, typer.Argument(help="Output folder for the MoE checkpoint.")],
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    workspace: WorkspaceOption = None,
) -> None:
    """Fetch the experts and build the MoE checkpoint at OUT (no calibration, no registry)."""
    root = _setup(workspace)
    # only what a merge needs: the pipeline module would import MLflow, GX and more (seconds)
    from mergeme.config import load_config
    from mergeme.merge.moe_builder import build_moe

    checkpoints = []
    try:
        settings = load_config(config)
        checkpoints = _fetch_checkpoints(settings, root)
        report = build_moe(checkpoints[0], checkpoints[1:], out, settings.merge, overwrite)
    except (MergemeError, FileExistsError, ValueError) as error:
        _fail(error)
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    typer.echo(json.dumps(report.__dict__, indent=2))


def _fetch_checkpoints(settings: PipelineConfig, root: Path) -> list[Checkpoint]:
    """The base, then every expert, fetched and opened. Local folders are used as they are:
    the pipeline's content hash (a read of every weight byte) keys nothing here. MLflow is
    imported only when a source needs it."""
    from mergeme.checkpoint import Checkpoint
    from mergeme.config import LocalSource, MlflowSource
    from mergeme.errors import SourceError
    from mergeme.fetch import fetch_checkpoint

    entries = [(settings.base.name, "base", None, settings.base.source)]
    entries += [(e.name, "expert", e.domain, e.source) for e in settings.experts]
    if any(isinstance(source, MlflowSource) for *_, source in entries):
        from mergeme.registry.store import connect

        connect(settings.registry.tracking_uri, root)
    checkpoints = []
    for name, role, domain, source in entries:
        if isinstance(source, LocalSource):
            if not Path(source.path).is_dir():
                raise SourceError(f"{role} {name!r}: local folder {source.path} does not exist")
            folder = Path(source.path)
        else:
            folder = Path(fetch_checkpoint(name, role, domain, source, root).path)
        checkpoints.append(Checkpoint(folder, name=name, allow_pickle=settings.merge.allow_pickle))
    return checkpoints


@app.command()
def validate(config: ConfigOption, workspace: WorkspaceOption = None) -> None:
    """Run the validation checks alone; exit 1 with every problem listed if any is found."""
    root = _setup(workspace)
    from mergeme.config import load_config
    from mergeme.pipeline import fetch_step, validate_step
    from mergeme.registry.store import connect

    try:
        settings = load_config(config)
        connect(settings.registry.tracking_uri, root)
        fetched = fetch_step(settings, root)
        # a folder of its own per run: no GX result or Data Docs page of an earlier run mixes in
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        report = validate_step(fetched, root / "validation" / stamp, settings)
    except MergemeError as error:
        _fail(error)
    typer.echo(f"valid: {len(fetched)} checkpoints; report in {report['stats_csv']}")


@app.command("register-checkpoint")
def register_checkpoint(
    path: Annotated[Path, typer.Argument(help="A dense checkpoint folder.")],
    name: Annotated[str, typer.Option(help="Registered model name.")],
    alias: Annotated[str, typer.Option(help="Alias to point at the version.")] = "current",
    experiment: str = "mergeme-checkpoints",
    tracking_uri: str | None = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Register a dense checkpoint in MLflow (a no-op if its weights are already registered)."""
    root = _setup(workspace)
    from mergeme.registry.checkpoints import register_dense_checkpoint
    from mergeme.registry.store import connect

    connect(tracking_uri, root)
    try:
        version, created = register_dense_checkpoint(path, name, alias, experiment, root)
    except MergemeError as error:
        _fail(error)
    state = "registered" if created else "already registered"
    typer.echo(f"{name} version {version} {state} (alias {alias})")


# promote, rollback, audit, diff, schedule
from mergeme.cli_release import add_release_commands  # noqa: E402

add_release_commands(app)
