"""The MLflow tracking store and model registry, as mergeme uses them.

Checkpoints are logged as pyfunc models defined from ``mlflow/checkpoint_model.py`` with the
checkpoint folder as their artifact; releases are registered model versions created with
all their tags in one call, so a version never exists without its lineage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergeme.errors import RegistryError, RegistryUnavailable, SourceError
from mergeme.workspace import default_tracking_uri

logger = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).resolve().parents[2] / "mlflow" / "checkpoint_model.py"
CHECKPOINT_ARTIFACT = "checkpoint"
MAX_TAG_LENGTH = 5000


def connect(tracking_uri: str | None, workspace: Path) -> str:
    """Point MLflow at ``tracking_uri`` (default: the workspace's sqlite store)."""
    import mlflow

    uri = tracking_uri or default_tracking_uri(workspace)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str, workspace: Path) -> str:
    """The id of experiment ``name``, created with an artifact folder in the workspace when
    the store is local."""
    import mlflow

    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (workspace / "mlflow" / "artifacts" / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def pip_requirements() -> list[str]:
    import safetensors
    import torch
    import transformers

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"safetensors=={safetensors.__version__}",
        "pandas",
    ]


def own_model_type(checkpoint: Path) -> str | None:
    """The checkpoint's ``model_type`` if it is one of mergeme's own model classes (which a
    serving environment can only load with mergeme's code), else None."""
    import json

    from mergeme.models.ppl_routed import MODEL_TYPE

    config = Path(checkpoint) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    return model_type if model_type == MODEL_TYPE else None


def _stage_package(folder: Path) -> Path:
    """A copy of the mergeme package's Python files under ``folder``; returns its path."""
    import shutil

    package = Path(__file__).resolve().parents[1]
    target = folder / package.name
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def log_checkpoint_model(
    checkpoint: Path, name: str = "model", extra_artifacts: dict[str, Path] | None = None
):
    """Log ``checkpoint`` in the active run as a pyfunc model, with ``extra_artifacts`` (e.g.
    the model card) stored inside the model beside it; returns MLflow's ModelInfo.

    A checkpoint of one of mergeme's own model classes ships the mergeme package with the
    model (MLflow ``code_paths``), so it loads where mergeme is not installed.
    """
    import tempfile
    import warnings

    from mlflow.models import infer_signature

    import mlflow

    signature = infer_signature({"prompt": ["2 + 3 ="]}, ["5"], params={"max_new_tokens": 16})
    with tempfile.TemporaryDirectory(prefix="mergeme-code-") as staging, warnings.catch_warnings():
        # an input example would make MLflow load the whole checkpoint and generate from it
        # to validate the example; the signature is given, so its advice does not apply
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        code_paths = None
        if own_model_type(checkpoint) is not None:
            code_paths = [str(_stage_package(Path(staging)))]
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_CODE),
            artifacts={
                CHECKPOINT_ARTIFACT: str(checkpoint),
                **{key: str(path) for key, path in (extra_artifacts or {}).items()},
            },
            code_paths=code_paths,
            pip_requirements=pip_requirements(),
            signature=signature,
        )


def _tag_value(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_TAG_LENGTH else text[: MAX_TAG_LENGTH - 3] + "..."


def register_version(
    model_name: str, model_uri: str, run_id: str | None, tags: dict[str, object], alias: str | None
) -> str:
    """Create a new version of ``model_name`` with all ``tags`` at once and point ``alias``
    at it; returns the version number as a string."""
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name)
    version = client.create_model_version(
        model_name,
        source=model_uri,
        run_id=run_id,
        tags={key: _tag_value(value) for key, value in tags.items()},
        # a tracking server only accepts a logged-model source together with its id
        model_id=model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None,
    )
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


def find_version_by_tag(model_name: str, key: str, value: str) -> str | None:
    """The newest version of ``model_name`` whose tag ``key`` equals ``value``, if any."""
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name='{model_name}' and tags.{key}='{value}'")
    if not versions:
        return None
    return str(max(int(v.version) for v in versions))


# MLflow error codes of a registry that could not answer (connection refused, 5xx, throttled)
OUTAGE_ERROR_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
)


def is_outage(error: Exception) -> bool:
    """Whether an MLflow error means the registry did not answer (worth a retry), rather than
    that the request was wrong."""
    return getattr(error, "error_code", None) in OUTAGE_ERROR_CODES


@contextmanager
def registry_errors(action: str) -> Iterator[None]:
    """Turn MLflow's errors inside the block into mergeme's: :class:`RegistryUnavailable`
    when the store did not answer (worth a retry), :class:`RegistryError` when it refused.

    Raises:
        RegistryUnavailable: an outage (connection refused, timeout, 5xx, database locked).
        RegistryError: any other MLflow error.
    """
    import requests
    from mlflow.exceptions import MlflowException

    import mlflow

    try:
        yield
    except (MlflowException, requests.exceptions.RequestException) as exc:
        uri = mlflow.get_tracking_uri()
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        if isinstance(exc, requests.exceptions.RequestException) or is_outage(exc):
            raise RegistryUnavailable(
                f"{action}: the MLflow store at {uri} did not answer ({first}); check that the "
                "tracking server runs, or fix registry.tracking_uri in the config"
            ) from exc
        raise RegistryError(f"{action}: the MLflow store at {uri} refused it ({first})") from exc


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: str
    run_id: str | None
    source: str


def resolve_model_uri(uri: str) -> ResolvedModel:
    """Resolve ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` to a concrete version.

    Raises:
        SourceError: the model, version or alias does not exist in the registry.
        RegistryUnavailable: the registry did not answer (the fetch step retries).
    """
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    reference = uri.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            found = client.get_model_version_by_alias(name, alias)
        else:
            name, version = reference.rsplit("/", 1)
            found = client.get_model_version(name, version)
    except MlflowException as exc:
        if is_outage(exc):
            raise RegistryUnavailable(
                f"{uri}: the MLflow registry at {client._registry_uri} did not answer "
                f"({exc.message.splitlines()[0][:300]}); check that the server runs"
            ) from exc
        raise SourceError(
            f"{uri}: not found in the MLflow registry at {client._registry_uri} "
            f"({exc.message.splitlines()[0]}); register the model first or fix the URI"
        ) from exc
    return ResolvedModel(found.name, str(found.version), found.run_id, found.source)


def download_checkpoint(resolved: ResolvedModel, destination: Path) -> Path:
    """Download a registered checkpoint model into ``destination``; returns the checkpoint
    folder inside it."""
    import mlflow

    destination.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{resolved.name}/{resolved.version}", dst_path=str(destination)
    )
    mlmodel = yaml.safe_load((Path(local) / "MLmodel").read_text())
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts") or {}
    if CHECKPOINT_ARTIFACT not in artifacts:
        raise SourceError(
            f"models:/{resolved.name}/{resolved.version} has no '{CHECKPOINT_ARTIFACT}' artifact; "
            "register dense checkpoints with `mergeme register-checkpoint`"
        )
    return Path(local) / artifacts[CHECKPOINT_ARTIFACT]["path"]
