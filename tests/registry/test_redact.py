"""Secrets never reach MLflow: the redaction rules, and a real release in a real store."""

from __future__ import annotations

import pytest

from mergeme.registry.redact import REDACTED, is_secret_key, redact_mapping, redact_text

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


def test_a_release_stores_no_secret(tiny_family, tmp_path):
    import mlflow
    from mergeme.registry.lineage import lineage_tags
    from mergeme.registry.release import register_release
    from mergeme.registry.store import connect
    from mlflow import MlflowClient

    connect(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    fetched = [
        {
            "name": "base",
            "role": "base",
            "domain": None,
            "source": f"https://bob:{PASSWORD}@hub.example.org/base",
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
    )

    # read everything back from the store
    run = mlflow.get_run(release.run_id)
    version = MlflowClient().get_model_version("secret-free", release.version)
    stored = {**run.data.params, **run.data.tags, **version.tags}
    everything = " ".join(f"{k}={v}" for k, v in stored.items())
    for secret in (PASSWORD, HF_TOKEN, "plain-looking-value"):
        assert secret not in everything
    assert run.data.params["source.hf_token"] == REDACTED
    assert run.data.params["source.repo_id"] == "org/model"
    assert run.data.params["merge.experts_per_token"] == "2"
    assert version.tags["mergeme.base.base.source"].startswith(f"https://bob:{REDACTED}@")
