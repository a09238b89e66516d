"""The workspace: one folder for everything a run writes (MLflow store, Prefect state and
results, fetched experts, merged checkpoints), and the environment that keeps the tools in it.
"""

from __future__ import annotations

import os
from pathlib import Path

WORKSPACE_ENV = "MERGEME_HOME"
DEFAULT_WORKSPACE = ".mergeme"


def workspace_root(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$MERGEME_HOME``, else ``./.mergeme`` (absolute)."""
    chosen = explicit or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
    return Path(chosen).expanduser().resolve()


def tool_environment(root: Path) -> dict[str, str]:
    """Environment variables that keep MLflow, Prefect, DVC, GX and HF inside ``root``, stop
    their telemetry, and MLflow's and transformers' per-file progress bars."""
    return {
        WORKSPACE_ENV: str(root),
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # no per-file progress bars when MLflow downloads or uploads artifacts
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # transformers' "Loading weights" bars follow this too: one per model load is noise
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "prefect" / "results"),
        # the first start of a fresh Prefect database runs migrations for about 20 s
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        "DVC_SITE_CACHE_DIR": str(root / "dvc-site-cache"),
        "HF_HOME": str(root / "huggingface"),
        "HF_DATASETS_CACHE": str(root / "huggingface" / "datasets"),
        "MPLCONFIGDIR": str(root / "matplotlib"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def configure_environment(explicit: str | Path | None = None, override: bool = False) -> Path:
    """Create the workspace and export :func:`tool_environment`; call before importing
    Prefect or MLflow. Variables already set are kept unless ``override``."""
    root = workspace_root(explicit)
    root.mkdir(parents=True, exist_ok=True)
    for key, value in tool_environment(root).items():
        if override or key not in os.environ:
            os.environ[key] = value
    return root


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"


def configure_logging() -> None:
    """mergeme's own milestones at INFO; other libraries (GX, httpx, ...) only from WARNING."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergeme").setLevel(logging.INFO)
