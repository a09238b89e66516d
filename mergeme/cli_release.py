"""Release commands of the ``mergeme`` command line: promote, rollback, audit, diff, schedule.

Registered on the main app by :func:`add_release_commands`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mergeme.errors import MergemeError
from mergeme.workspace import configure_environment, configure_logging

TrackingOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI; default: the workspace's sqlite store.",
        show_default=False,
    ),
]
WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="The mergeme workspace.", show_default=False),
]
PolicyOption = Annotated[
    Path | None,
    typer.Option("--policy", help="Promotion policy (default: mlflow/promotion_policy.yaml)."),
]
StageOption = Annotated[
    str | None,
    typer.Option("--stage", help="Also set the legacy stage (Production or Staging; deprecated)."),
]


def _connect(workspace: Path | None, tracking_uri: str | None) -> Path:
    root = configure_environment(workspace, override=workspace is not None)
    configure_logging()
    from mergeme.registry.store import connect

    connect(tracking_uri, root)
    return root


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _stage(stage: str | None) -> str | None:
    if stage not in (None, "Production", "Staging"):
        _fail(MergemeError(f"--stage {stage}: use Production or Staging"))
    return stage


def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[
        str, typer.Option("--version", "-v", help="The version to promote, or @ALIAS.")
    ],
    reason: Annotated[str, typer.Option(help="Why; recorded on the version.")] = "",
    policy: PolicyOption = None,
    stage: StageOption = None,
    tracking_uri: TrackingOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Make VERSION the champion if its eval metrics pass the policy; exit 1 if refused."""
    _connect(workspace, tracking_uri)
    from mergeme.registry.audit import resolve_release
    from mergeme.registry.promotion import load_policy
    from mergeme.registry.promotion import promote as promote_release

    try:
        if version.startswith("@"):
            version = str(resolve_release(f"{name}{version}").version)
        result = promote_release(name, version, load_policy(policy), reason, stage=_stage(stage))
    except MergemeError as error:
        _fail(error)
    typer.echo(result.summary())
    if not result.passed:
        raise typer.Exit(code=1)


def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Annotated[str, typer.Option(help="Why; recorded on the version.")] = "",
    policy: PolicyOption = None,
    stage: StageOption = None,
    tracking_uri: TrackingOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Restore the previous champion (the replaced one becomes previous-champion)."""
    _connect(workspace, tracking_uri)
    from mergeme.registry.promotion import load_policy
    from mergeme.registry.promotion import rollback as rollback_release

    try:
        restored, replaced = rollback_release(
            name, load_policy(policy), reason, stage=_stage(stage)
        )
    except MergemeError as error:
        _fail(error)
    typer.echo(f"{name}: champion is version {restored} again (was {replaced})")


def audit(
    reference: Annotated[str, typer.Argument(help="NAME@ALIAS or NAME/VERSION.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    tracking_uri: TrackingOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Print what produced a release: experts, settings, data, code, Prefect run, metrics."""
    _connect(workspace, tracking_uri)
    from mergeme.registry.audit import format_lineage, release_lineage

    try:
        lineage = release_lineage(reference)
    except MergemeError as error:
        _fail(error)
    typer.echo(json.dumps(lineage, indent=2) if as_json else format_lineage(lineage))


def diff(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    a: Annotated[str, typer.Argument(help="A version number or @alias.")],
    b: Annotated[str, typer.Argument(help="Another version number or @alias.")],
    tracking_uri: TrackingOption = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Show what differs between two releases: experts, settings, data, metrics."""
    _connect(workspace, tracking_uri)
    from mergeme.registry.audit import diff_releases, format_diff, release_lineage

    def reference(which: str) -> str:
        return f"{name}{which}" if which.startswith("@") else f"{name}/{which}"

    try:
        left, right = release_lineage(reference(a)), release_lineage(reference(b))
    except MergemeError as error:
        _fail(error)
    typer.echo(format_diff(a, b, diff_releases(left, right)))


def schedule(
    prefect_file: Annotated[
        Path | None,
        typer.Option("--prefect-file", help="Deployment file (default: infra/prefect.yaml)."),
    ] = None,
    deployment: Annotated[str, typer.Option(help="Deployment name in the file.")] = "retrain",
    workspace: WorkspaceOption = None,
) -> None:
    """Serve the pipeline locally on the deployment's cron schedule (stops with Ctrl-C)."""
    configure_environment(workspace, override=workspace is not None)
    from flows.schedule import DEFAULT_PREFECT_FILE, load_deployment, serve_pipeline

    try:
        settings = load_deployment(prefect_file or DEFAULT_PREFECT_FILE, deployment)
    except MergemeError as error:
        _fail(error)
    serve_pipeline(settings)


def add_release_commands(app: typer.Typer) -> None:
    """Register the release commands on ``app``."""
    for command in (promote, rollback, audit, diff, schedule):
        app.command()(command)
