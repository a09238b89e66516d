"""The merge pipeline: fetch → validate → merge → route-calibrate → evaluate → register."""

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from mergeme.config import load_config
from mergeme.pipeline import now_ms
from mergeme.registry.store import connect
from mergeme.report import release_summary
from mergeme.workspace import workspace_root
from tasks.calibrate import calibrate_routes
from tasks.evaluate import evaluate_models
from tasks.fetch import fetch_experts
from tasks.merge import merge_experts
from tasks.register import register_moe
from tasks.validate import validate_checkpoints
from tasks.workspace import clean_workspace


@flow(name="mergeme-pipeline", log_prints=True)
def merge_pipeline(config_path: str, workspace: str | None = None) -> dict:
    """Run every step for the config at ``config_path``; returns the steps' outputs."""
    started_ms = now_ms()  # steps that ran before this are reused from an earlier run
    config = load_config(config_path)
    root = workspace_root(workspace)
    connect(config.registry.tracking_uri, root)
    report_dir = root / "runs" / str(flow_run.get_id() or "local")

    clean_workspace(root)
    fetched = fetch_experts(config, root)
    validation = validate_checkpoints(fetched, report_dir / "validation", config, root)
    merged = merge_experts(config, fetched, root)
    calibrated = calibrate_routes(config, merged, root, fetched)
    evaluation = evaluate_models(config, calibrated, fetched, report_dir / "evaluation", root)
    release = register_moe(
        config,
        Path(config_path),
        root,
        fetched,
        validation,
        merged,
        calibrated,
        evaluation,
        started_ms,
    )
    # what a scheduled run did, in the flow run's logs (the CLI prints the full report)
    get_run_logger().info(release_summary(release))
    return {
        "fetched": fetched,
        "validation": validation,
        "merge": merged,
        "calibration": calibrated,
        "evaluation": evaluation,
        "release": release,
    }
