"""Shared fixtures: an isolated workspace for the whole session (set before Prefect or
MLflow is imported) and tiny real checkpoints built on the fly."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# every tool writes into a throw-away workspace, never into $HOME or the repo
_SESSION_WORKSPACE = Path(tempfile.mkdtemp(prefix="mergeme-tests-"))
os.environ["MERGEME_HOME"] = str(_SESSION_WORKSPACE)
from mergeme.workspace import configure_environment  # noqa: E402

configure_environment(_SESSION_WORKSPACE, override=True)

import pytest  # noqa: E402

from tests.factories import TinyFamily, build_tiny_family  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_SESSION_WORKSPACE, ignore_errors=True)


@pytest.fixture(scope="session")
def session_workspace() -> Path:
    return _SESSION_WORKSPACE


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> TinyFamily:
    """A tiny Llama base, three experts derived from it, a tokenizer and demo data."""
    return build_tiny_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory, tiny_family) -> Path:
    """A real DVC project whose `data` stage built small demo data (dvc.lock has its md5)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("dvc-project")
    (root / "params.yaml").write_text(
        "data:\n  seed: 5\n  train_size: 12\n  calibration_size: 6\n  eval_size: 6\n"
        "  max_chars: 200\n"
    )
    (root / "dvc.yaml").write_text(
        "stages:\n  data:\n"
        f"    cmd: {sys.executable} -m mergeme.demo.data --params params.yaml --out data/demo\n"
        "    params: [data]\n    outs: [data/demo]\n"
    )
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([*dvc, "repro", "-q"], cwd=root, check=True, capture_output=True)
    return root


def write_pipeline_config(folder: Path, family: TinyFamily, project: Path, **sections) -> Path:
    """A pipeline config over the tiny family and the DVC project's data."""
    import yaml

    config = {
        "base": {"name": "base", "source": {"kind": "local", "path": str(family.base)}},
        "experts": [
            {"name": domain, "domain": domain, "source": {"kind": "local", "path": str(path)}}
            for domain, path in family.experts.items()
        ],
        "router": {"max_texts_per_domain": 6, "max_length": 48},
        "data": {"root": str(project / "data" / "demo"), "dvc_lock": str(project / "dvc.lock")},
        "evaluate": {"max_texts_per_domain": 6, "max_length": 48},
        "registry": {
            "model_name": "tiny-moe",
            "experiment": "tests",
            "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        },
    }
    config.update(sections)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
