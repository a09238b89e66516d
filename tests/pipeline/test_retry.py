"""Retries of the network steps: a registry outage is retried with back-off; a missing model
fails at once with a message that says what to do."""

from __future__ import annotations

import pytest
import yaml
from prefect import flow
from prefect.states import Failed

from mergeme.config import load_config
from mergeme.errors import RegistryUnavailable, SourceError
from mergeme.registry.store import connect
from tasks.fetch import fetch_experts
from tasks.retry import is_transient
from tests.conftest import write_pipeline_config
from tests.registry.tracking_server import free_port


@pytest.mark.parametrize(
    "error, retried",
    [
        (SourceError("models:/x@y: not found"), False),
        (RegistryUnavailable("server down"), True),
        (ConnectionError("reset by peer"), True),
    ],
)
def test_only_transient_errors_are_retried(error, retried):
    assert is_transient(None, None, Failed(data=error)) is retried


@flow
def fetch_only(config, workspace, retry_delay: float) -> dict:
    task = fetch_experts.with_options(retries=2, retry_delay_seconds=retry_delay)
    state = task(config, workspace, return_state=True)
    return {"task_run_id": state.state_details.task_run_id, "error": state.result(False)}


def _attempts(task_run_id) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(task_run_id).run_count


def _registry_config(tmp_path, tiny_family, dvc_project, tracking_uri: str):
    path = write_pipeline_config(tmp_path, tiny_family, dvc_project)
    raw = yaml.safe_load(path.read_text())
    raw["experts"][0]["source"] = {"kind": "mlflow", "uri": "models:/no-such-model@current"}
    raw["registry"]["tracking_uri"] = tracking_uri
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.slow
def test_missing_model_fails_once_with_a_clear_error(
    prefect_harness, tiny_family, dvc_project, tmp_path
):
    config = _registry_config(tmp_path, tiny_family, dvc_project, f"sqlite:///{tmp_path}/m.db")
    connect(config.registry.tracking_uri, tmp_path)
    outcome = fetch_only(config, tmp_path, retry_delay=0.1)
    assert isinstance(outcome["error"], SourceError)
    assert "models:/no-such-model@current: not found" in str(outcome["error"])
    assert _attempts(outcome["task_run_id"]) == 1


@pytest.mark.slow
def test_registry_outage_is_retried_then_named(
    prefect_harness, tiny_family, dvc_project, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = _registry_config(tmp_path, tiny_family, dvc_project, dead)
    connect(dead, tmp_path)
    outcome = fetch_only(config, tmp_path, retry_delay=0.1)
    assert isinstance(outcome["error"], RegistryUnavailable)
    assert f"the MLflow registry at {dead} did not answer" in str(outcome["error"])
    assert _attempts(outcome["task_run_id"]) == 3
