"""The scheduled retraining deployment in infra/prefect.yaml: it loads, runs the pipeline
on its cron schedule, and its parameters name a config that loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.schedule import DEFAULT_PREFECT_FILE, REPO_ROOT, load_deployment, to_deployment
from mergeme.config import load_config
from mergeme.errors import ConfigError


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
