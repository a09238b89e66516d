"""The whole validate step: checkpoints, then data, one report; on failure the report is
kept as a FAILED MLflow run before the error stops the pipeline.

``pipeline.validate_step`` and ``mergeme validate`` both call ``run_validation``, so the CLI
and the flow give the same messages.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mergeme.config import PipelineConfig, ValidationConfig
from mergeme.validation.checkpoints import ValidationReport, validate_checkpoints, write_report
from mergeme.validation.data_suite import DataSettings, build_data_table, validate_data_table
from mergeme.validation.dvc_lock import uncommitted_data_problems

logger = logging.getLogger(__name__)


def validate_data(config: PipelineConfig, report: ValidationReport, report_dir: Path) -> None:
    """Add the problems of the calibration and eval files (suite ``mergeme_data`` and the
    ``dvc.lock`` check: the files match it and lie inside the locked stage's outputs) to
    ``report``, and write the data table, GX result and Data Docs. Without ``data.dvc_lock``
    the data's identity is unchecked, with a WARNING."""
    limits = config.validation
    settings = DataSettings(
        root=config.data.root,
        domains=config.domains(),
        calibration_split=config.data.calibration_split,
        eval_split=config.data.eval_split,
        min_text_chars=limits.min_text_chars,
        max_text_chars=limits.max_text_chars,
    )
    table, problems = build_data_table(settings)
    report.add(problems)
    report.data_table_csv = str(report_dir / "data_rows.csv")
    table.to_csv(report.data_table_csv, index=False)
    if len(table):
        problems, result_json, docs_index = validate_data_table(
            table, settings, report_dir / "data_docs_data"
        )
        report.add(problems)
        report.data_gx_result_json = str(report_dir / "gx_data.json")
        Path(report.data_gx_result_json).write_text(json.dumps(result_json, indent=2))
        report.data_docs_index = str(docs_index) if docs_index else None
    data = config.data
    if data.dvc_lock is None:
        logger.warning(
            "data.dvc_lock is not set: the identity of the data under %s is unchecked (no md5 "
            "is compared); set data.dvc_lock to the dvc.lock of the stage that wrote it",
            data.root,
        )
        return
    report.add(
        uncommitted_data_problems(data.dvc_lock, data.dvc_stage, data.allow_uncommitted, data.root)
    )


def run_validation(
    fetched: list[dict], report_dir: Path, config: PipelineConfig | None = None
) -> ValidationReport:
    """Validate the fetched checkpoints and, given ``config``, its data; never raises on bad
    input (the report says what is wrong)."""
    settings = config.validation if config is not None else ValidationConfig()
    # merge.allow_pickle belongs to the merge engine; absent, pickle is refused
    allow_pickle = bool(getattr(config.merge, "allow_pickle", False)) if config else False
    base = next(item for item in fetched if item["role"] == "base")
    experts = {item["name"]: Path(item["path"]) for item in fetched if item["role"] == "expert"}
    # duplicates are experts with the same weights (content_hash also covers the tokenizer)
    hashes = {
        item["name"]: item.get("weights_hash", item["content_hash"])
        for item in fetched
        if item["role"] == "expert"
    }
    report = validate_checkpoints(
        (base["name"], Path(base["path"])),
        experts,
        report_dir,
        allowed_dtypes=list(settings.allowed_dtypes),
        max_relative_task_vector=settings.max_relative_task_vector,
        allow_pickle=allow_pickle,
        allow_remote_code=settings.allow_remote_code,
        content_hashes=hashes,
        max_abs_value=settings.max_abs_value,
    )
    if config is not None:
        validate_data(config, report, report_dir)
    report.success = not report.problems
    write_report(report, report_dir)
    return report


def log_failed_validation(
    report: ValidationReport, config: PipelineConfig, workspace: Path, run_name: str
) -> str:
    """Keep a failed report as an MLflow run with status FAILED: the config (secrets hidden),
    the problem kinds, the tables, GX results and both Data Docs sites. Returns the run id."""
    import mlflow
    from mergeme.registry.redact import redact_mapping
    from mergeme.registry.release import flatten
    from mergeme.registry.store import ensure_experiment
    from mlflow import MlflowClient

    experiment_id = ensure_experiment(config.registry.experiment, workspace)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
    try:
        mlflow.log_params(redact_mapping(flatten("", json.loads(config.model_dump_json()))))
        kinds = ",".join(sorted(set(report.kinds)))
        mlflow.set_tags({"mergeme.validation": "failed", "mergeme.validation.kinds": kinds})
        mlflow.log_metric("validation_problems", len(report.problems))
        files = (report.report_json, report.stats_csv, report.gx_result_json)
        for file in (*files, report.data_table_csv, report.data_gx_result_json):
            if file and Path(file).is_file():
                mlflow.log_artifact(file, artifact_path="validation")
        for index in (report.docs_index, report.data_docs_index):
            if index and Path(index).is_file():
                folder = Path(index).parent
                mlflow.log_artifacts(str(folder), artifact_path=f"validation/{folder.name}")
    finally:
        mlflow.end_run()
        MlflowClient().set_terminated(run.info.run_id, status="FAILED")
    logger.info("validation report kept in MLflow run %s (FAILED)", run.info.run_id)
    return run.info.run_id
