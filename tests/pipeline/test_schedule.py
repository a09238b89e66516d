"""The scheduled retraining deployment in infra/prefect.yaml: it loads, runs the pipeline
on its cron schedule, its parameters name a config that loads, and `mergeme schedule` serves
it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ObjectNotFound

from flows.schedule import DEFAULT_PREFECT_FILE, REPO_ROOT, load_deployment, to_deployment
from mergeme.config import load_config
from mergeme.errors import ConfigError
from tests.conftest import write_pipeline_config
from tests.pipeline.runs import registered_versions, run_pipeline


def test_deployment_has_the_schedule_and_parameters():
    settings = load_deployment(DEFAULT_PREFECT_FILE)
    deployment = to_deployment(settings)

    raw = yaml.safe_load(DEFAULT_PREFECT_FILE.read_text())["deployments"][0]
    assert deployment.name == "retrain" == raw["name"]
    assert deployment.flow_name == "mergeme-pipeline"
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == raw["schedules"][0]["cron"] == "0 3 * * 1"
    assert schedule.active is True
    config_path = Path(deployment.parameters["config_path"])
    assert config_path == REPO_ROOT / "configs" / "demo.yaml"
    assert load_config(config_path).registry.model_name == "mergeme-demo-moe"
    assert deployment.parameters["workspace"] == str(REPO_ROOT / ".mergeme")


def test_entrypoint_loads_the_pipeline_flow():
    from prefect.flows import load_flow_from_entrypoint

    settings = load_deployment(DEFAULT_PREFECT_FILE)
    loaded = load_flow_from_entrypoint(str(REPO_ROOT / settings.entrypoint))
    assert loaded.name == "mergeme-pipeline"
    assert set(loaded.parameters.properties) == {"config_path", "workspace"}


def test_bad_deployment_files_are_named(tmp_path):
    missing = tmp_path / "prefect.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_deployment(missing)
    raw = yaml.safe_load(DEFAULT_PREFECT_FILE.read_text())
    raw["deployments"][0]["schedules"][0]["cron"] = "every monday"
    missing.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="schedules.0.cron"):
        load_deployment(missing)
    with pytest.raises(ConfigError, match="no deployment named 'nightly'"):
        load_deployment(DEFAULT_PREFECT_FILE, "nightly")


@pytest.mark.slow
def test_deployment_applies_to_a_prefect_server(prefect_harness):
    """Registered with the (temporary) Prefect API, the deployment keeps schedule and params."""
    from prefect.client.orchestration import get_client

    settings = load_deployment(DEFAULT_PREFECT_FILE)
    deployment_id = to_deployment(settings).apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert stored.parameters == settings.parameters.model_dump()
    assert [s.schedule.cron for s in stored.schedules] == ["0 3 * * 1"]


def _deployment_file(tmp_path: Path, config_path: Path, workspace: Path) -> Path:
    """infra/prefect.yaml with its parameters pointed at a test config and workspace (and a
    name of its own: the session's Prefect API may hold `retrain` from another test)."""
    raw = yaml.safe_load(DEFAULT_PREFECT_FILE.read_text())
    raw["deployments"][0]["name"] = "retrain-served"
    raw["deployments"][0]["parameters"] = {
        "config_path": str(config_path),
        "workspace": str(workspace),
    }
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _wait_for_final_state(client, flow_run_id, server: subprocess.Popen, limit_s: float):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        if server.poll() is not None:
            raise RuntimeError(f"mergeme schedule exited early: {server.stdout.read()[-4000:]}")
        time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} did not finish within {limit_s} s")


@pytest.mark.slow
def test_served_schedule_runs_the_pipeline_and_an_unchanged_run_registers_nothing(
    prefect_harness, tiny_family, dvc_project, tmp_path
):
    """`mergeme schedule` serves the deployment; a run of it, with the inputs of the release
    already registered, reuses that release and says so in the flow run's logs; a run after a
    settings change registers a version whose lineage names the deployment and flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL

    config_path = write_pipeline_config(tmp_path, tiny_family, dvc_project)
    config_path.write_text(
        config_path.read_text().replace("model_name: tiny-moe", "model_name: scheduled-moe")
    )
    workspace = tmp_path / "workspace"
    first, _ = run_pipeline(config_path, workspace)
    assert first["release"]["created"] is True

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"
    command = [str(Path(sys.executable).parent / "mergeme"), "schedule"]
    command += ["--prefect-file", str(_deployment_file(tmp_path, config_path, workspace))]
    command += ["--deployment", "retrain-served", "--workspace", str(workspace)]
    server = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:  # serve() registers the deployment once it has started
                try:
                    deployment = client.read_deployment_by_name("mergeme-pipeline/retrain-served")
                    break
                except ObjectNotFound:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
            assert deployment.parameters["workspace"] == str(workspace)

            flow_run = client.create_flow_run_from_deployment(deployment.id)
            finished = _wait_for_final_state(client, flow_run.id, server, limit_s=300)
            version = first["release"]["version"]
            expected = f"Inputs unchanged: nothing new registered; scheduled-moe version {version} "
            # the runner's subprocess ships its logs in batches, so the last may come after the
            # final state
            log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
            deadline = time.monotonic() + 60
            while True:
                messages = [log.message for log in client.read_logs(log_filter=log_filter)]
                if any(m.startswith(expected) for m in messages) or time.monotonic() > deadline:
                    break
                time.sleep(1)

            # new settings: the next run of the deployment registers a version that names it
            config_path.write_text(
                config_path.read_text().replace(
                    "max_texts_per_domain: 6", "max_texts_per_domain: 5", 1
                )
            )
            second_run = client.create_flow_run_from_deployment(deployment.id)
            second = _wait_for_final_state(client, second_run.id, server, limit_s=300)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    assert finished.state.is_completed(), finished.state.message
    assert finished.deployment_id == deployment.id
    assert any(message.startswith(expected) for message in messages), messages
    assert second.state.is_completed(), second.state.message
    versions = registered_versions("scheduled-moe")
    assert versions[0] == version and len(versions) == 2
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version("scheduled-moe", versions[1]).tags
    assert tags["mergeme.prefect_deployment_id"] == str(deployment.id)
    assert tags["mergeme.prefect_flow_run_id"] == str(second_run.id)
