"""Secrets never reach MLflow: the redaction rules, and real releases in a real store, read
back whole (params, tags, step runs, artifacts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergeme.registry.redact import (
    REDACTED,
    is_secret_key,
    redact_mapping,
    redact_text,
    write_redacted_yaml,
)

HF_TOKEN = "hf_" + "Ab1" * 12
PASSWORD = "s3cr3t-pa55"


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("hf_token", True),
        ("registry.token", True),
        ("source.api_key", True),
        ("db.password", True),
        ("aws.credentials", True),
        ("merge.experts_per_token", False),
        ("evaluate.max_tokens", False),
        ("registry.tracking_uri", False),
    ],
)
def test_secret_keys_are_recognised(key, secret):
    assert is_secret_key(key) is secret


def test_uri_passwords_tokens_and_environment_secrets_are_hidden(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "environment-only-secret")
    text = (
        f"https://alice:{PASSWORD}@mlflow.example.org/api token={HF_TOKEN} "
        "password is environment-only-secret"
    )
    redacted = redact_text(text)
    assert PASSWORD not in redacted and HF_TOKEN not in redacted
    assert "environment-only-secret" not in redacted
    assert redacted.startswith(f"https://alice:{REDACTED}@mlflow.example.org/api")
    assert redact_text("http://mlflow.internal:5000") == "http://mlflow.internal:5000"
    assert redact_mapping({"merge.experts_per_token": 2}) == {"merge.experts_per_token": "2"}


def _stored_text(experiment_name: str, model_name: str, tmp_path: Path) -> bytes:
    """Everything the store holds for an experiment and a registered model: every run's params
    and tags (nested step runs included), the version tags, and the bytes of every artifact of
    the runs and of the registered model."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert len(runs) >= 2  # the release run and its step runs
    parts = []
    for run in runs:
        parts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        folder = tmp_path / "downloaded" / run.info.run_id
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(folder))
        parts += [f.read_bytes().decode("latin-1") for f in folder.rglob("*") if f.is_file()]
    for version in client.search_model_versions(f"name='{model_name}'"):
        parts += [f"{k}={v}" for k, v in version.tags.items()]
        folder = tmp_path / "downloaded" / f"version-{version.version}"
        mlflow.artifacts.download_artifacts(version.source, dst_path=str(folder))
        parts += [f.read_bytes().decode("latin-1") for f in folder.rglob("*") if f.is_file()]
    return "\n".join(parts).encode("latin-1")


def test_yaml_is_redacted_key_by_key_and_stays_readable(tmp_path):
    source = tmp_path / "pipeline.yaml"
    source.write_text(
        f"# pulled with {HF_TOKEN}\n"
        "registry:\n"
        f"  tracking_uri: https://carol:{PASSWORD}@mlflow.example.org\n"
        "  hf_token: plain-looking-value\n"
        "merge: {experts_per_token: 2, density: 0.5}\n"
        f"experts: [{{name: a, note: 'token {HF_TOKEN}'}}]\n"
    )
    (tmp_path / "out").mkdir()
    written = write_redacted_yaml(source, tmp_path / "out")

    assert written.name == "pipeline.yaml"
    text = written.read_text()
    for secret in (PASSWORD, HF_TOKEN, "plain-looking-value"):
        assert secret not in text
    assert yaml.safe_load(text) == {
        "registry": {
            "tracking_uri": f"https://carol:{REDACTED}@mlflow.example.org",
            "hf_token": REDACTED,
        },
        "merge": {"experts_per_token": 2, "density": 0.5},
        "experts": [{"name": "a", "note": f"token {REDACTED}"}],
    }


def test_a_release_stores_no_secret(tiny_family, tmp_path):
    import mlflow
    from mergeme.registry.lineage import lineage_tags
    from mergeme.registry.lineage_run import StepRecord
    from mergeme.registry.release import register_release
    from mergeme.registry.store import connect
    from mlflow import MlflowClient

    connect(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    source = f"https://bob:{PASSWORD}@hub.example.org/base"
    fetched = [
        {
            "name": "base",
            "role": "base",
            "domain": None,
            "source": source,
            "resolved": "local",
            "content_hash": "0" * 64,
        }
    ]
    merge = {"trunk_method": "average", "trunk_parameters": {}, "architecture": "mixtral"}
    merge["experts_per_token"] = 2
    tags = lineage_tags(fetched, merge, {"method": "centroid", "settings": {}}, {}, "abc", None)
    tags["mergeme.note"] = f"pulled with {HF_TOKEN}"
    params = {
        "registry": {"tracking_uri": f"https://carol:{PASSWORD}@mlflow.example.org"},
        "source": {"hf_token": "plain-looking-value", "repo_id": "org/model"},
        "merge": {"experts_per_token": 2},
    }
    # the step runs: the fetch record lists each source as it was configured
    steps = {
        "fetch": StepRecord({"base.base.source": source}, {"checkpoints": 1.0}),
        "merge": StepRecord({"merge.hf_token": "plain-looking-value"}, tags={"note": HF_TOKEN}),
    }
    release = register_release(
        workspace=tmp_path,
        experiment="secrets",
        model_name="secret-free",
        alias="candidate",
        checkpoint=tiny_family.base,
        params=params,
        metrics={},
        artifacts=[],
        tags=tags,
        steps=steps,
    )

    stored = _stored_text("secrets", "secret-free", tmp_path)
    for secret in (PASSWORD, HF_TOKEN, "plain-looking-value"):
        assert secret.encode() not in stored
    run = mlflow.get_run(release.run_id)
    assert run.data.params["source.hf_token"] == REDACTED
    assert run.data.params["source.repo_id"] == "org/model"
    assert run.data.params["merge.experts_per_token"] == "2"
    version = MlflowClient().get_model_version("secret-free", release.version)
    assert version.tags["mergeme.base.base.source"].startswith(f"https://bob:{REDACTED}@")
    children = MlflowClient().search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{release.run_id}'"
    )
    fetch = next(r for r in children if r.data.tags["mergeme.step"] == "fetch")
    assert fetch.data.params["base.base.source"] == f"https://bob:{REDACTED}@hub.example.org/base"


def test_the_register_step_stores_no_secret(tiny_family, dvc_project, tmp_path):
    from mergeme.config import load_config
    from mergeme.pipeline import fetch_step, register_step
    from mergeme.registry.store import connect
    from tests.conftest import write_pipeline_config

    # a config whose tracking URI carries a password (the run itself uses a local store)
    registry = {
        "model_name": "secret-free-moe",
        "experiment": "register-secrets",
        "tracking_uri": f"https://carol:{PASSWORD}@mlflow.example.org",
    }
    config_path = write_pipeline_config(tmp_path, tiny_family, dvc_project, registry=registry)
    config = load_config(config_path)
    workspace = tmp_path / "workspace"
    connect(f"sqlite:///{tmp_path / 'mlflow.db'}", workspace)
    fetched = fetch_step(config, workspace)
    fetched[0]["source"] = f"https://bob:{HF_TOKEN}@hub.example.org/base"
    merged = {
        "trunk_method": "average",
        "trunk_parameters": {},
        "architecture": "mixtral",
        "experts_per_token": 2,
        "key": "k",
        "tensors_written": 1,
        "total_bytes": 1.0,
    }
    validation = {"stats_csv": None, "gx_result_json": None, "docs_index": None, "problems": []}
    release = register_step(
        config,
        config_path,
        workspace,
        fetched,
        validation,
        merged,
        {"output": str(tiny_family.base), "key": "c"},
        {"files": [], "metrics": {"eval_loss.moe.math": 1.0}},
        flow_run_id=None,
    )

    assert release["created"]
    stored = _stored_text("register-secrets", "secret-free-moe", tmp_path)
    for secret in (PASSWORD, HF_TOKEN):
        assert secret.encode() not in stored
    # the config artifact is still readable YAML with the URI's user and host
    import mlflow

    folder = tmp_path / "config-artifact"
    mlflow.artifacts.download_artifacts(
        run_id=release["run_id"], artifact_path="pipeline.yaml", dst_path=str(folder)
    )
    logged = yaml.safe_load((folder / "pipeline.yaml").read_text())
    assert logged["registry"]["tracking_uri"] == f"https://carol:{REDACTED}@mlflow.example.org"
    assert logged["experts"] == yaml.safe_load(config_path.read_text())["experts"]
