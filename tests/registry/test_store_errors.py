"""MLflow errors become mergeme's: an outage is worth a retry, a refused request is not."""

from __future__ import annotations

import pytest

from mergeme.errors import RegistryError, RegistryUnavailable
from mergeme.registry.store import connect, registry_errors
from tests.registry.tracking_server import free_port


def test_a_refused_request_is_a_registry_error(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    connect(uri, tmp_path)
    with pytest.raises(RegistryError, match=f"reading run: the MLflow store at {uri} refused it"):
        with registry_errors("reading run"):
            MlflowClient().get_run("0" * 32)


def test_an_unreachable_server_is_an_outage(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    connect(uri, tmp_path)
    with pytest.raises(RegistryUnavailable, match=f"the MLflow store at {uri} did not answer"):
        with registry_errors("listing experiments"):
            MlflowClient().search_experiments()
