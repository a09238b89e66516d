"""A pipeline run killed (SIGKILL) in the middle of the merge, then started again: it completes,
reuses the steps that finished, leaves no half-written folder and registers one version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_pipeline_config
from tests.pipeline.runs import STEPS, ran, registered_versions, run_pipeline

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]


def partial_folders(workspace: Path) -> list[Path]:
    return [p for p in workspace.rglob("*") if p.is_dir() and ".partial-" in p.name]


def start_and_kill_during_merge(config_path: Path, workspace: Path, marker: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    # the subprocess reports to the session's Prefect API, like a worker would
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [sys.executable, "-m", "tests.pipeline.slow_merge"]
    process = subprocess.Popen(
        [*command, str(config_path), str(workspace), str(marker)],
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the flow ended before the merge: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise TimeoutError("the merge did not start within 240 s")
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()


def test_killed_merge_resumes_without_partial_output_or_duplicates(
    prefect_harness, tiny_family, dvc_project, tmp_path
):
    config_path = write_pipeline_config(tmp_path, tiny_family, dvc_project)
    config_path.write_text(
        config_path.read_text().replace("model_name: tiny-moe", "model_name: resumed-moe")
    )
    workspace = tmp_path / "workspace"

    start_and_kill_during_merge(config_path, workspace, tmp_path / "merge-started")
    assert partial_folders(workspace), "the kill should have hit a half-written merge"
    assert not [p for p in (workspace / "merges").iterdir() if not p.name.startswith(".")]

    result, states = run_pipeline(config_path, workspace)
    assert states["validate checkpoints"] == "Cached"  # finished before the kill
    assert ran(states) == [s for s in STEPS if s != "validate checkpoints"]
    assert partial_folders(workspace) == []
    assert result["release"]["created"] is True
    assert registered_versions("resumed-moe") == [result["release"]["version"]]
