"""Helpers for flow tests: run the pipeline and read which steps executed from the Prefect
API (Completed: the step ran; Cached: its persisted result was reused)."""

from __future__ import annotations

from pathlib import Path

STEPS = ["fetch experts", "validate checkpoints", "merge", "route-calibrate", "evaluate"]


def executed_steps(flow_run_id) -> dict[str, str]:
    """``{task name: final state name}`` of one flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def run_pipeline(config_path: Path, workspace: Path) -> tuple[dict, dict[str, str]]:
    from flows.pipeline import merge_pipeline

    state = merge_pipeline(str(config_path), str(workspace), return_state=True)
    return state.result(), executed_steps(state.state_details.flow_run_id)


def ran(states: dict[str, str]) -> list[str]:
    return [step for step in STEPS if states[step] == "Completed"]


def registered_versions(name: str = "tiny-moe") -> list[str]:
    from mlflow import MlflowClient

    return sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'"))
