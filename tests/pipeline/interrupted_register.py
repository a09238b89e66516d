"""Run the register step and die at a chosen point, as a killed process would: ``os._exit``
runs no ``except`` or ``finally`` clause, so MLflow is left exactly as a SIGKILL leaves it.

Usage: python -m tests.pipeline.interrupted_register STEP_OUTPUTS TRACKING_URI WORKSPACE POINT
with POINT ``before-version`` (every run logged, no version yet) or ``after-version`` (the
version exists, its alias not yet set).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

KILLED = 137


def die(*args, **kwargs):
    os._exit(KILLED)


def main(outputs_file: str, tracking_uri: str, workspace: str, point: str) -> None:
    from mergeme.config import load_config
    from mergeme.pipeline import register_step
    from mergeme.registry.store import connect
    from mlflow import MlflowClient

    outputs = json.loads(Path(outputs_file).read_text())
    connect(tracking_uri, Path(workspace))
    if point == "after-version":
        MlflowClient.set_registered_model_alias = die
    elif point == "before-version":
        MlflowClient.create_model_version = die
    else:
        raise SystemExit(f"unknown point {point!r}")
    register_step(
        load_config(outputs["config_path"]),
        Path(outputs["config_path"]),
        Path(workspace),
        outputs["fetched"],
        outputs["validation"],
        outputs["merged"],
        outputs["calibrated"],
        outputs["evaluation"],
        None,
    )
    raise SystemExit("the register step was not interrupted")


if __name__ == "__main__":
    main(*sys.argv[1:5])
