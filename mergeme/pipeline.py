"""The pipeline's steps as plain functions: fetch, validate, merge, calibrate, evaluate,
register. Each takes the config and earlier steps' outputs (JSON-ready dicts) and returns
its own; ``flows/`` and ``tasks/`` only orchestrate them.

Merged and calibrated checkpoints live in the workspace under the step's fingerprint
(``mergeme.versioning``: the content of every input, the settings and the step's code
version), so a repeated step finds its finished output and reuses it, and a code change builds
a new one.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from mergeme import versioning
from mergeme.checkpoint import Checkpoint
from mergeme.config import PipelineConfig
from mergeme.data import load_texts
from mergeme.evaluate import load_causal_lm, score_domains
from mergeme.fetch import fetch_checkpoint
from mergeme.file_hashes import FileHashCache
from mergeme.merge.moe_builder import build_moe
from mergeme.registry.lineage import lineage_tags, package_revision
from mergeme.registry.redact import write_redacted_yaml
from mergeme.registry.release import register_release
from mergeme.routing.calibrate import calibrate_routers
from mergeme.routing.diagnostics import (
    routing_counts,
    shares_from_counts,
    write_routing_diagnostics,
)
from mergeme.validation.checkpoints import ValidationFailed
from mergeme.validation.step import log_failed_validation, run_validation

logger = logging.getLogger(__name__)


def now_ms() -> int:
    """The wall clock in epoch milliseconds, as MLflow records run times."""
    return int(time.time() * 1000)


def timed_step(step: Callable[..., dict]) -> Callable[..., dict]:
    """Add ``timing: {started_ms, finished_ms}`` to a step's output. A result reused from the
    Prefect cache keeps the times of the run that computed it, which is how the register step
    tells a reused step from one that ran (see ``step_records``)."""

    @functools.wraps(step)
    def run(*args, **kwargs) -> dict:
        started = now_ms()
        result = step(*args, **kwargs)
        return {**result, "timing": {"started_ms": started, "finished_ms": now_ms()}}

    return run


def fetch_step(config: PipelineConfig, workspace: Path) -> list[dict]:
    """Resolve the base and every expert to a local folder with its content hashes (files
    unchanged since an earlier run are not read again)."""
    hashes = FileHashCache.in_workspace(workspace)
    base = config.base
    fetched = [fetch_checkpoint(base.name, "base", None, base.source, workspace, hashes)]
    for expert in config.experts:
        fetched.append(
            fetch_checkpoint(expert.name, "expert", expert.domain, expert.source, workspace, hashes)
        )
    hashes.save()
    return [asdict(item) for item in fetched]


@timed_step
def validate_step(
    fetched: list[dict],
    report_dir: Path,
    config: PipelineConfig | None = None,
    workspace: Path | None = None,
    run_name: str | None = None,
) -> dict:
    """Validate every checkpoint and, given ``config``, the data.

    With ``workspace`` too, a failed report is kept as a FAILED MLflow run first.

    Raises:
        ValidationFailed: any problem; the error lists them all and holds the saved report.
    """
    report = run_validation(fetched, report_dir, config)
    if not report.success:
        if config is not None and workspace is not None:
            log_failed_validation(report, config, workspace, run_name or "validation-failed")
        raise ValidationFailed(report)
    return asdict(report)


@timed_step
def merge_step(config: PipelineConfig, fetched: list[dict], workspace: Path) -> dict:
    """Build the MoE (or reuse the one already built from the same inputs and settings)."""
    key = versioning.merge_fingerprint(config, fetched)
    out = workspace / "merges" / key
    report_file = out / "mergeme_merge.json"
    if report_file.is_file():
        logger.info("reusing merged checkpoint %s", out)
        return {**json.loads(report_file.read_text()), "key": key}
    base_item = next(item for item in fetched if item["role"] == "base")
    allow_pickle = config.merge.allow_pickle
    base = Checkpoint(base_item["path"], name=base_item["name"], allow_pickle=allow_pickle)
    experts = [
        Checkpoint(item["path"], name=item["name"], allow_pickle=allow_pickle)
        for item in fetched
        if item["role"] == "expert"
    ]
    try:
        report = build_moe(base, experts, out, config.merge)
    finally:
        for checkpoint in [base, *experts]:
            checkpoint.close()
    return {**asdict(report), "key": key}


def _texts_by_domain(
    config: PipelineConfig, split: str, limit: int, workspace: Path
) -> dict[str, list[str]]:
    cache = workspace / "huggingface" / "datasets"
    return {
        domain: load_texts(config.data.root, domain, split, cache, limit)
        for domain in config.domains()
    }


@timed_step
def calibrate_step(
    config: PipelineConfig, merged: dict, workspace: Path, fetched: list[dict] | None = None
) -> dict:
    """Set the routers from the calibration split (or reuse an identical earlier result).

    ``fetched`` (the fetch step's output) gives the dense experts that ``ppl_probe`` and
    ``ppl_sequence`` need; ``finetune`` trains on ``router.finetune.split`` when set."""
    router = config.router
    texts = _texts_by_domain(
        config, config.data.calibration_split, router.max_texts_per_domain, workspace
    )
    train = None
    if router.method == "finetune" and router.finetune.split is not None:
        train = _texts_by_domain(
            config, router.finetune.split, router.finetune.max_texts_per_domain, workspace
        )
    experts = {item["name"]: item for item in fetched or [] if item["role"] == "expert"}
    # the merge key already covers every checkpoint's content hash
    key = versioning.calibrate_fingerprint(config, merged)
    out = workspace / "calibrated" / key
    report_file = out / "mergeme_router.json"
    if report_file.is_file():
        logger.info("reusing calibrated checkpoint %s", out)
        return {**json.loads(report_file.read_text()), "key": key}
    texts_per_expert = [texts[expert.domain] for expert in config.experts]
    report = calibrate_routers(
        Path(merged["output"]),
        out,
        texts_per_expert,
        router,
        expert_paths=[Path(experts[e.name]["path"]) for e in config.experts if e.name in experts],
        train_texts_per_expert=[train[e.domain] for e in config.experts] if train else None,
        expert_names=[expert.name for expert in config.experts],
    )
    return {**asdict(report), "key": key}


@timed_step
def evaluate_step(
    config: PipelineConfig,
    calibrated: dict,
    fetched: list[dict],
    report_dir: Path,
    workspace: Path,
) -> dict:
    """Per-domain loss and perplexity of the MoE, the base and every expert; the MoE's routing
    shares. Writes ``eval_table.csv`` and ``routing_shares.csv`` into ``report_dir``."""
    import pandas as pd

    settings = config.evaluate
    texts = _texts_by_domain(
        config, config.data.eval_split, settings.max_texts_per_domain, workspace
    )
    candidates = {"moe": Path(calibrated["output"])}
    candidates.update({item["name"]: Path(item["path"]) for item in fetched})
    rows, shares = [], {}
    for name, path in candidates.items():
        model, tokenizer = load_causal_lm(path)
        scores = score_domains(
            model, tokenizer, name, texts, settings.max_length, settings.batch_size
        )
        rows += [asdict(score) for score in scores]
        if name == "moe":
            counts = routing_counts(
                model, tokenizer, texts, settings.max_length, settings.batch_size
            )
            shares = shares_from_counts(counts)
        del model

    report_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(report_dir / "eval_table.csv", index=False)
    expert_names = [expert.name for expert in config.experts]
    share_table = pd.DataFrame(shares, index=expert_names).T.rename_axis("domain")
    share_table.to_csv(report_dir / "routing_shares.csv")
    metrics = {f"eval_loss.{r['model']}.{r['domain']}": r["loss"] for r in rows}
    metrics |= {f"eval_perplexity.{r['model']}.{r['domain']}": r["perplexity"] for r in rows}
    for domain, row in shares.items():
        metrics |= {f"routing_share.{domain}.{e}": s for e, s in zip(expert_names, row)}
    diagnostics, diagnostic_metrics = write_routing_diagnostics(
        counts, expert_names, report_dir / "routing", calibrated
    )
    metrics |= diagnostic_metrics
    return {
        "rows": rows,
        "routing_shares": shares,
        "experts": expert_names,
        "metrics": metrics,
        "files": [
            str(report_dir / "eval_table.csv"),
            str(report_dir / "routing_shares.csv"),
            *diagnostics,
        ],
    }


def register_step(
    config: PipelineConfig,
    config_path: Path,
    workspace: Path,
    fetched: list[dict],
    validation: dict,
    merged: dict,
    calibrated: dict,
    evaluation: dict,
    flow_run_id: str | None,
    deployment_id: str | None = None,
    pipeline_started_ms: int | None = None,
) -> dict:
    """Log the run and register the MoE as a new version with its lineage and alias; when a
    version with the same input fingerprint exists, register nothing and return that one
    (``created`` tells which), finishing it first if its registration was interrupted.

    ``pipeline_started_ms`` (when the pipeline run began) lets each step's nested run say
    whether the step ran in this pipeline run or was reused from an earlier one.

    Raises:
        RegistryUnavailable: the MLflow store did not answer (the register task retries).
        RegistryError: the MLflow store refused a request.
    """
    from mergeme.registry.release_lineage import close_interrupted_runs, existing_release
    from mergeme.registry.store import registry_errors

    with registry_errors(f"registering {config.registry.model_name}"):
        existing = existing_release(config, calibrated, fetched)
        if existing is not None:
            return existing
        fingerprint = versioning.release_fingerprint(config, calibrated, fetched)
        close_interrupted_runs(config.registry.experiment, fingerprint)
        release, tags = _register_new(
            config,
            config_path,
            workspace,
            fetched,
            validation,
            merged,
            calibrated,
            evaluation,
            flow_run_id,
            deployment_id,
            pipeline_started_ms,
        )
    return {**asdict(release), "tags": tags, "created": True}


def _evidence_files(validation: dict, evaluation: dict) -> list[Path]:
    """The files and folders logged as run artifacts besides the config: the eval tables,
    the validation evidence and both Data Docs sites."""
    artifacts = [*map(Path, evaluation["files"])]
    evidence = (validation["stats_csv"], validation["gx_result_json"], validation["docs_index"])
    artifacts += [Path(p) for p in evidence[:2] if p]
    if evidence[2]:
        artifacts.append(Path(evidence[2]).parent)  # the Data Docs site folder
    # the data suite's evidence, when the step validated the data too
    artifacts += [Path(p) for p in (validation.get("data_gx_result_json"),) if p]
    if validation.get("data_docs_index"):
        artifacts.append(Path(validation["data_docs_index"]).parent)
    return artifacts


def _register_new(
    config: PipelineConfig,
    config_path: Path,
    workspace: Path,
    fetched: list[dict],
    validation: dict,
    merged: dict,
    calibrated: dict,
    evaluation: dict,
    flow_run_id: str | None,
    deployment_id: str | None,
    pipeline_started_ms: int | None,
):
    from mergeme.registry.lineage_run import step_records
    from mergeme.registry.release_lineage import dvc_data_md5s, release_data, release_tags

    dvc_md5, uncommitted = dvc_data_md5s(config)
    router = {"method": config.router.method, "settings": config.router.model_dump()}
    tags = lineage_tags(fetched, merged, router, dvc_md5, package_revision(), flow_run_id)
    tags |= release_tags(config, calibrated, fetched, deployment_id)
    tags["mergeme.data_uncommitted"] = str(uncommitted).lower()
    curves = calibrated.get("loss_curves") or {}
    # the config as written, minus secrets (a tracking URI may hold a password)
    with tempfile.TemporaryDirectory(prefix="mergeme-config-") as folder:
        config_copy = write_redacted_yaml(Path(config_path), Path(folder))
        release = register_release(
            workspace=workspace,
            experiment=config.registry.experiment,
            model_name=config.registry.model_name,
            alias=config.registry.alias,
            checkpoint=Path(calibrated["output"]),
            params=release_params(config, merged),
            metrics=evaluation["metrics"],
            artifacts=[config_copy, *_evidence_files(validation, evaluation)],
            tags=tags,
            run_name=f"{config.registry.model_name}-{flow_run_id or 'local'}",
            steps=step_records(
                config, fetched, validation, merged, calibrated, evaluation, pipeline_started_ms
            ),
            data=release_data(config, dvc_md5, uncommitted),
            # in the run before the version exists, so a registered release never lacks them
            log_more=lambda run_id: log_loss_curves(run_id, curves),
        )
    return release, tags


def log_loss_curves(run_id: str, curves: dict[str, list[float]]) -> None:
    """Log router fine-tuning curves into run ``run_id`` as step metrics ``finetune.<name>``."""
    if not curves:
        return
    import time

    from mlflow.entities import Metric

    from mlflow import MlflowClient

    now = int(time.time() * 1000)  # one millisecond apart, so the points keep their order
    metrics = [
        Metric(f"finetune.{name}", float(value), now + step, step)
        for name, values in curves.items()
        for step, value in enumerate(values)
    ]
    client = MlflowClient()
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def release_params(config: PipelineConfig, merged: dict) -> dict:
    """The MLflow params of a release: the whole config, plus under ``trunk`` the parameters
    the chosen trunk method actually used (density, scale, seed, agreement, weights)."""
    return {**json.loads(config.model_dump_json()), "trunk": merged["trunk_parameters"]}
