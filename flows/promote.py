"""Promotion as a Prefect flow: gate a release on the promotion policy and move `champion`."""

from prefect import flow

from mergeme.registry.store import connect
from mergeme.workspace import workspace_root
from tasks.promote import promote_release


@flow(name="mergeme-promote")
def promote_flow(
    model_name: str,
    version: str,
    reason: str = "",
    policy_file: str | None = None,
    stage: str | None = None,
    tracking_uri: str | None = None,
    workspace: str | None = None,
) -> dict:
    """Promote ``version`` of ``model_name``; returns the checks and the verdict."""
    connect(tracking_uri, workspace_root(workspace))
    return promote_release(model_name, version, policy_file, reason, stage)
