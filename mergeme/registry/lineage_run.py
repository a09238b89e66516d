"""The run record of a release: one nested MLflow run per pipeline step, and the calibration
and eval data as MLflow dataset inputs.

The parent run (one per pipeline run) is opened by ``register_release``; the records here are
built from the steps' outputs, so a step whose result came from the Prefect cache is recorded
with the same facts and the same start and end times as when it ran, and its
``mergeme.reused`` tag says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
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
    # when the step ran (epoch ms), if its output says; None: recorded at logging time
    started_ms: int | None = None
    finished_ms: int | None = None


def _timed(record: StepRecord, output: dict, pipeline_started_ms: int | None) -> StepRecord:
    """``record`` with the times of ``output`` (see ``pipeline.timed_step``) and, given when
    the pipeline run began, a ``mergeme.reused`` tag: true when the step ran before it."""
    timing = output.get("timing") or {}
    started, finished = timing.get("started_ms"), timing.get("finished_ms")
    tags = dict(record.tags)
    if started is not None and pipeline_started_ms is not None:
        tags["mergeme.reused"] = str(started < pipeline_started_ms).lower()
    return StepRecord(record.params, record.metrics, tags, started, finished)


@dataclass(frozen=True)
class DataInput:
    """One data split as an MLflow dataset input."""

    name: str  # e.g. "calibration"
    split: str
    files: dict[str, str]  # domain -> jsonl path
    digest: str  # an md5 over the split's per-file md5s (see split_digest)
    tags: dict[str, str]


def step_records(
    config: PipelineConfig,
    fetched: list[dict],
    validation: dict,
    merged: dict,
    calibrated: dict,
    evaluation: dict,
    pipeline_started_ms: int | None = None,
) -> dict[str, StepRecord]:
    """A record per step, in pipeline order, from the step outputs; ``pipeline_started_ms``
    (when this pipeline run began) marks the steps reused from an earlier run."""
    fetch_params = {}
    for item in fetched:
        for key in ("source", "resolved", "content_hash", "weights_hash"):
            if key in item:
                fetch_params[f"{item['role']}.{item['name']}.{key}"] = item[key]
    layers = calibrated.get("max_cosine_between_rows", [])
    records = {
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
    # fetch runs in every pipeline run and its output carries no times
    outputs = {"validate": validation, "merge": merged, "calibrate": calibrated}
    outputs["evaluate"] = evaluation
    for step, output in outputs.items():
        records[step] = _timed(records[step], output, pipeline_started_ms)
    return records


def log_step_runs(records: dict[str, StepRecord], parent_run_id: str) -> dict[str, str]:
    """Log each record as a run nested in ``parent_run_id``, spanning the step's own start
    and end times when the record has them; returns step -> run id."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run_ids = {}
    for step, record in records.items():
        # a fetch record holds each source, which may carry a token
        tags = redact_mapping({"mergeme.step": step, **record.tags})
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(
            experiment_id, start_time=record.started_ms, tags=tags, run_name=step
        )
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in redact_mapping(record.params).items()]
        ended = record.finished_ms or int(time.time() * 1000)
        metrics = [Metric(k, float(v), ended, 0) for k, v in record.metrics.items()]
        # MLflow takes at most 100 params and 1000 metrics per batch
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        client.set_terminated(run_id, "FINISHED", end_time=record.finished_ms)
        run_ids[step] = run_id
    return run_ids


def split_digest(file_md5s: dict[str, str]) -> str:
    """The dataset digest of one split: an md5 (32 hex) over its ``domain md5`` lines, sorted,
    so changing any one domain's file changes it (MLflow keeps at most 36 characters)."""
    lines = "\n".join(f"{domain} {md5}" for domain, md5 in sorted(file_md5s.items()))
    return hashlib.md5(lines.encode()).hexdigest()


def data_inputs(
    config: PipelineConfig,
    dvc_md5: dict[str, str],
    uncommitted: bool,
    split_md5: dict[str, dict[str, str]],
) -> list[DataInput]:
    """The calibration and eval splits, each with its own digest (:func:`split_digest`) and,
    as tags, the data stage's DVC md5s (``dvc_md5.<output>``; ``uncommitted``: the data
    differs from dvc.lock), each domain file's md5 (``md5.<domain>``) and the git revision.

    ``split_md5`` maps a split name to ``{domain: md5 of that domain's file}``.
    """
    from mergeme.registry.lineage import git_revision

    revision = git_revision(Path(config.data.root))
    # one tag per md5: an input tag holds at most 500 characters
    stage_tags = {f"dvc_md5.{out}": md5 for out, md5 in sorted(dvc_md5.items())}
    result = []
    for name, split in (
        ("calibration", config.data.calibration_split),
        ("eval", config.data.eval_split),
    ):
        files = {d: str(split_path(config.data.root, d, split)) for d in config.domains()}
        tags = {
            **stage_tags,
            "dvc_stage": config.data.dvc_stage,
            "dvc_uncommitted": str(uncommitted).lower(),
            **{f"md5.{domain}": md5 for domain, md5 in sorted(split_md5[split].items())},
            "git_revision": revision,
        }
        result.append(DataInput(name, split, files, split_digest(split_md5[split]), tags))
    return result


def _local_source(folder: Path):
    """An MLflow dataset source for a local folder. MLflow registers its local source twice
    (for the schemes ``""`` and ``file``) and warns that a path is ambiguous unless it is
    resolved against one of them."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source

    local = [s for s in get_registered_sources() if s._get_source_type() == "local"]
    return resolve_dataset_source(str(folder), candidate_sources=local[:1])


def log_data_inputs(inputs: list[DataInput]) -> None:
    """Log each split (all domains, one row per text) as a dataset input of the active run."""
    import pandas as pd

    import mlflow

    for item in inputs:
        frames = [
            pd.read_json(path, lines=True).assign(domain=domain)[["domain", "text"]]
            for domain, path in item.files.items()
        ]
        source = Path(next(iter(item.files.values()))).parent.parent
        dataset = mlflow.data.from_pandas(
            pd.concat(frames, ignore_index=True),
            source=_local_source(source),
            name=f"{source.name}-{item.split}",  # e.g. demo-calibration
            digest=item.digest,
        )
        mlflow.log_input(dataset, context=item.name, tags=item.tags)
