"""Helpers for flow tests: run the pipeline and read which steps executed from the Prefect
API (Completed: the step ran; Cached: its persisted result was reused)."""

from __future__ import annotations

from pathlib import Path

STEPS = ["fetch experts", "validate checkpoints", "merge", "route-calibrate", "evaluate"]


def executed_steps(flow_run_id, timeout: float = 30.0) -> dict[str, str]:
    """``{task name: final state name}`` of one flow run, from the Prefect API (which may
    record a task's final state a moment after the flow returns: wait for it)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            states = {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}
            if all(run.state.is_final() for run in runs) or time.monotonic() > deadline:
                return states
            time.sleep(0.2)


def run_to_state(config_path: Path, workspace: Path):
    """Run the pipeline; returns its final Prefect state (failed or not) and the step states."""
    from flows.pipeline import merge_pipeline

    state = merge_pipeline(str(config_path), str(workspace), return_state=True)
    return state, executed_steps(state.state_details.flow_run_id)


def run_pipeline(config_path: Path, workspace: Path) -> tuple[dict, dict[str, str]]:
    state, states = run_to_state(config_path, workspace)
    return state.result(), states


def ran(states: dict[str, str]) -> list[str]:
    return [step for step in STEPS if states[step] == "Completed"]


def registered_versions(name: str = "tiny-moe") -> list[str]:
    from mlflow import MlflowClient

    return sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'"))
