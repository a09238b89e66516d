"""The run record of a release: one nested MLflow run per pipeline step, and the calibration
and eval data as MLflow dataset inputs.

The parent run (one per pipeline run) is opened by ``register_release``; the records here are
built from the steps' outputs, so a step whose result came from the Prefect cache is recorded
with the same facts as when it ran (its ``mergeme.reused`` tag says so).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mergeme.config import PipelineConfig
from mergeme.data import split_path
from mergeme.registry.redact import redact_mapping

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """What one pipeline step used (params) and measured (metrics)."""

    params: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DataInput:
    """One data split as an MLflow dataset input."""

    name: str  # e.g. "calibration"
    split: str
    files: dict[str, str]  # domain -> jsonl path
    digest: str  # the DVC md5 of the data stage output (or of the files when no dvc.lock)
    tags: dict[str, str]


def step_records(
    config: PipelineConfig,
    fetched: list[dict],
    validation: dict,
    merged: dict,
    calibrated: dict,
    evaluation: dict,
) -> dict[str, StepRecord]:
    """A record per step, in pipeline order, from the step outputs."""
    fetch_params = {}
    for item in fetched:
        for key in ("source", "resolved", "content_hash"):
            fetch_params[f"{item['role']}.{item['name']}.{key}"] = item[key]
    layers = calibrated.get("max_cosine_between_rows", [])
    return {
        "fetch": StepRecord(fetch_params, {"checkpoints": float(len(fetched))}),
        "validate": StepRecord(
            {"checks": "tensor stats, Great Expectations suite"},
            {"problems": float(len(validation.get("problems", [])))},
        ),
        "merge": StepRecord(
            {
                **{f"merge.{k}": str(v) for k, v in config.merge.model_dump().items()},
                "architecture": merged["architecture"],
                "trunk_parameters": json.dumps(merged["trunk_parameters"], sort_keys=True),
                "output_key": merged["key"],
            },
            {"tensors_written": float(merged["tensors_written"]), "bytes": merged["total_bytes"]},
        ),
        "calibrate": StepRecord(
            {
                **{f"router.{k}": str(v) for k, v in config.router.model_dump().items()},
                "texts_per_expert": json.dumps(calibrated.get("texts_per_expert")),
                "output_key": calibrated["key"],
            },
            {f"max_router_cosine.layer{i}": float(v) for i, v in enumerate(layers)},
        ),
        "evaluate": StepRecord(
            {f"evaluate.{k}": str(v) for k, v in config.evaluate.model_dump().items()},
            dict(evaluation["metrics"]),
        ),
    }


def log_step_runs(records: dict[str, StepRecord], parent_run_id: str) -> dict[str, str]:
    """Log each record as a run nested in the active parent run; returns step -> run id."""
    import mlflow

    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    run_ids = {}
    for step, record in records.items():
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=step, nested=True, parent_run_id=parent_run_id
        ) as run:
            # a fetch record holds each source, which may carry a token
            mlflow.log_params(redact_mapping(record.params))
            if record.metrics:
                mlflow.log_metrics(record.metrics)
            mlflow.set_tags(redact_mapping({"mergeme.step": step, **record.tags}))
            run_ids[step] = run.info.run_id
    return run_ids


def data_inputs(
    config: PipelineConfig, dvc_md5: dict[str, str], split_md5: dict[str, dict[str, str]]
) -> list[DataInput]:
    """The calibration and eval splits with their DVC md5 and git revision as tags.

    ``split_md5`` maps a split name to ``{domain: md5 of that domain's file}``.
    """
    from mergeme.registry.lineage import git_revision

    revision = git_revision(Path(config.data.root))
    stage_md5 = ",".join(sorted(dvc_md5.values()))
    result = []
    for name, split in (
        ("calibration", config.data.calibration_split),
        ("eval", config.data.eval_split),
    ):
        files = {d: str(split_path(config.data.root, d, split)) for d in config.domains()}
        file_md5 = json.dumps(split_md5[split], sort_keys=True)
        tags = {
            "dvc_md5": stage_md5 or "none",
            "dvc_stage": config.data.dvc_stage,
            "split_md5": file_md5,
            "git_revision": revision,
        }
        result.append(DataInput(name, split, files, stage_md5 or file_md5[:32], tags))
    return result


def log_data_inputs(inputs: list[DataInput]) -> None:
    """Log each split (all domains, one row per text) as a dataset input of the active run."""
    import pandas as pd

    import mlflow

    for item in inputs:
        frames = [
            pd.read_json(path, lines=True).assign(domain=domain)[["domain", "text"]]
            for domain, path in item.files.items()
        ]
        source = str(Path(next(iter(item.files.values()))).parent.parent)
        dataset = mlflow.data.from_pandas(
            pd.concat(frames, ignore_index=True),
            source=source,
            name=f"{item.name}-{item.split}",
            digest=item.digest,
        )
        mlflow.log_input(dataset, context=item.name, tags=item.tags)
