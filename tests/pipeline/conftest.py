"""Fixtures of the pipeline tests: the outputs of every step before register, computed once,
for the tests that exercise the register step on its own (interrupted, retried, over HTTP)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import write_pipeline_config


@dataclass(frozen=True)
class StepOutputs:
    """The register step's inputs, as the flow passes them; ``file`` holds them as JSON."""

    config_path: Path
    fetched: list[dict]
    validation: dict
    merged: dict
    calibrated: dict
    evaluation: dict
    file: Path

    def register(self, workspace: Path, flow_run_id: str | None = None, **calibrated) -> dict:
        """Run the register step (``calibrated`` overrides keys of the calibrate output)."""
        from mergeme.config import load_config
        from mergeme.pipeline import register_step

        return register_step(
            load_config(self.config_path),
            self.config_path,
            workspace,
            self.fetched,
            self.validation,
            self.merged,
            {**self.calibrated, **calibrated},
            self.evaluation,
            flow_run_id,
        )


@pytest.fixture(scope="session")
def step_outputs(tiny_family, dvc_project, tmp_path_factory) -> StepOutputs:
    """Fetch, validate (checkpoints and data), merge, fine-tune the routers for a few steps
    (so there are loss curves) and evaluate, on the tiny family."""
    from mergeme.config import load_config
    from mergeme.pipeline import (
        calibrate_step,
        evaluate_step,
        fetch_step,
        merge_step,
        validate_step,
    )

    folder = tmp_path_factory.mktemp("steps")
    router = {
        "method": "finetune",
        "max_texts_per_domain": 6,
        "max_length": 48,
        "finetune": {"steps": 3, "batch_size": 4, "max_texts_per_domain": 6},
    }
    config_path = write_pipeline_config(folder, tiny_family, dvc_project, router=router)
    config = load_config(config_path)
    workspace = folder / "workspace"
    fetched = fetch_step(config, workspace)
    validation = validate_step(fetched, folder / "report" / "validation", config)
    merged = merge_step(config, fetched, workspace)
    calibrated = calibrate_step(config, merged, workspace, fetched)
    evaluation = evaluate_step(
        config, calibrated, fetched, folder / "report" / "evaluation", workspace
    )
    outputs = {
        "config_path": str(config_path),
        "fetched": fetched,
        "validation": validation,
        "merged": merged,
        "calibrated": calibrated,
        "evaluation": evaluation,
    }
    file = folder / "step_outputs.json"
    file.write_text(json.dumps(outputs))
    return StepOutputs(**{**outputs, "config_path": config_path}, file=file)
