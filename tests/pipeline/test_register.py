"""The register step on its own, against real MLflow stores: a registration killed half-way
is finished (or cleaned up) by the next run; an unreachable tracking server is retried until
it answers; everything a release logs arrives over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from mergeme.errors import RegistryUnavailable
from mergeme.registry.release_lineage import FINGERPRINT_TAG
from mergeme.registry.store import connect
from tasks.retry import is_transient
from tests.pipeline.interrupted_register import KILLED
from tests.pipeline.runs import registered_versions
from tests.registry.tracking_server import free_port, mlflow_server

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]


def register_and_die(step_outputs, uri: str, workspace: Path, point: str) -> None:
    command = [sys.executable, "-m", "tests.pipeline.interrupted_register"]
    done = subprocess.run(
        [*command, str(step_outputs.file), uri, str(workspace), point],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
    )
    assert done.returncode == KILLED, done.stderr[-3000:]


def _runs(fingerprint: str) -> list:
    import mlflow

    experiment = mlflow.get_experiment_by_name("tests")
    return mlflow.MlflowClient().search_runs(
        [experiment.experiment_id], f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}'"
    )


def test_register_killed_after_the_version_is_finished_by_the_next_run(step_outputs, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_and_die(step_outputs, uri, tmp_path, "after-version")
    connect(uri, tmp_path)
    client = MlflowClient()
    [version] = client.search_model_versions("name='tiny-moe'")
    assert not client.get_registered_model("tiny-moe").aliases
    assert client.get_run(version.run_id).info.status == "RUNNING"

    release = step_outputs.register(tmp_path)
    assert release["created"] is False and release["version"] == str(version.version)
    assert release["alias"] == "candidate"
    assert str(client.get_model_version_by_alias("tiny-moe", "candidate").version) == "1"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mergeme.registered_version"] == "tiny-moe/1"
    # logged before the version existed, so the interrupted run already had them
    assert client.get_metric_history(version.run_id, "finetune.loss")
    assert registered_versions() == ["1"]


def test_register_killed_before_the_version_leaves_no_running_run(step_outputs, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_and_die(step_outputs, uri, tmp_path, "before-version")
    connect(uri, tmp_path)
    assert registered_versions() == []

    release = step_outputs.register(tmp_path)
    assert release["created"] is True and registered_versions() == [release["version"]]
    fingerprint = release["tags"][FINGERPRINT_TAG]
    status = {run.info.run_id: run.info.status for run in _runs(fingerprint)}
    assert status.pop(release["run_id"]) == "FINISHED"
    assert list(status.values()) == ["KILLED"]  # the interrupted attempt
    children = MlflowClient().search_runs(
        [MlflowClient().get_run(release["run_id"]).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{next(iter(status))}' and attributes.status = 'RUNNING'",
    )
    assert children == []


@pytest.mark.server
def test_register_retries_until_the_tracking_server_answers(
    prefect_harness, step_outputs, tmp_path, monkeypatch
):
    from prefect import flow

    from mergeme.config import load_config
    from tasks.register import register_moe

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    connect(uri, tmp_path)  # nothing listens there yet
    failures, started = [], []

    with ExitStack() as servers:

        def start_server_then_retry(task, task_run, state) -> bool:
            # called after a failed attempt: the outage must be worth a retry
            failures.append(state.result(raise_on_failure=False))
            if is_transient(task, task_run, state) and not started:
                started.append(servers.enter_context(mlflow_server(tmp_path, port=port)))
            return is_transient(task, task_run, state)

        @flow
        def register_only() -> dict:
            task = register_moe.with_options(
                retries=2, retry_delay_seconds=0.5, retry_condition_fn=start_server_then_retry
            )
            outputs = step_outputs
            state = task(
                load_config(outputs.config_path),
                outputs.config_path,
                tmp_path,
                outputs.fetched,
                outputs.validation,
                outputs.merged,
                outputs.calibrated,
                outputs.evaluation,
                return_state=True,
            )
            return {"run_count": _run_count(state), "release": state.result(False)}

        outcome = register_only()
        assert isinstance(failures[0], RegistryUnavailable), failures
        assert f"the MLflow registry at {uri} did not answer" in str(failures[0])
        assert outcome["run_count"] == 2 and len(failures) == 1
        assert outcome["release"]["created"] is True
        assert registered_versions() == [outcome["release"]["version"]]


def _run_count(state) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(state.state_details.task_run_id).run_count


@pytest.mark.server
def test_register_step_logs_everything_over_http(step_outputs, tmp_path):
    from mlflow import MlflowClient

    # more points than one MLflow batch takes (1000): the curve goes in several batches
    long_curve = [1.0 / (step + 1) for step in range(1500)]
    curves = {**step_outputs.calibrated["loss_curves"], "long": long_curve}
    with mlflow_server(tmp_path) as uri:
        connect(uri, tmp_path)
        first = step_outputs.register(tmp_path, loss_curves=curves)
        again = step_outputs.register(tmp_path, loss_curves=curves)
        client = MlflowClient()
        run_id = first["run_id"]

        # the fingerprint tag search finds the release over HTTP: nothing registered twice
        assert first["created"] is True and again["created"] is False
        assert again["version"] == first["version"] and registered_versions() == ["1"]

        # both Data Docs sites arrived as folders of the run
        for site in ("data_docs", "data_docs_data"):
            names = {item.path for item in client.list_artifacts(run_id, site)}
            assert f"{site}/index.html" in names
        history = client.get_metric_history(run_id, "finetune.long")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == long_curve
        real = step_outputs.calibrated["loss_curves"]["loss"]
        assert len(client.get_metric_history(run_id, "finetune.loss")) == len(real) > 0
