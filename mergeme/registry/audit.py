"""Audit: what produced a release, read back from its version tags and its run record, and
what differs between two releases."""

from __future__ import annotations

import json
import re

from mergeme.errors import MergemeError
from mergeme.registry.model_card import checkpoints_from_tags

REFERENCE = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
SETTING_TAGS = (
    "architecture",
    "trunk_method",
    "trunk_parameters",
    "experts_per_token",
    "merge_seed",
    "router_method",
    "router_settings",
    "router_seed",
)


def resolve_release(reference: str):
    """The registered version for ``NAME@ALIAS`` or ``NAME/VERSION`` (``models:/`` optional).

    Raises:
        MergemeError: the reference is malformed or names nothing in the registry.
    """
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    match = REFERENCE.match(reference)
    if match is None:
        raise MergemeError(f"{reference!r}: expected NAME@ALIAS or NAME/VERSION")
    client = MlflowClient()
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(match["name"], match["alias"])
        return client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        raise MergemeError(
            f"{reference}: not in the registry at {client._registry_uri} "
            f"({str(exc).splitlines()[0]})"
        ) from exc


def _aliases(name: str, version: str) -> list[str]:
    from mlflow import MlflowClient

    model = MlflowClient().get_registered_model(name)
    return sorted(alias for alias, v in (model.aliases or {}).items() if str(v) == version)


def _datasets(run) -> list[dict]:
    found = []
    for item in run.inputs.dataset_inputs if run is not None else []:
        tags = {tag.key: tag.value for tag in item.tags}
        found.append(
            {
                "name": item.dataset.name,
                "context": tags.pop("mlflow.data.context", ""),
                "digest": item.dataset.digest,
                **tags,
            }
        )
    return sorted(found, key=lambda d: d["context"])


def release_lineage(reference: str) -> dict:
    """Everything known about a release, grouped: experts, settings, data, code, Prefect,
    metrics, promotion."""
    from mlflow import MlflowClient

    version = resolve_release(reference)
    number, tags = str(version.version), dict(version.tags)
    run = MlflowClient().get_run(version.run_id) if version.run_id else None
    metrics = dict(run.data.metrics) if run is not None else {}

    def tag(key: str) -> str:
        return tags.get(f"mergeme.{key}", "")

    return {
        "release": {
            "model": version.name,
            "version": number,
            "aliases": _aliases(version.name, number),
            "stage": version.current_stage or "None",
            "run_id": version.run_id or "",
            "source": version.source,
            "input_fingerprint": tag("input_fingerprint"),
        },
        "checkpoints": checkpoints_from_tags(tags),
        "settings": {key: tag(key) for key in SETTING_TAGS},
        "data": {
            "dvc_md5": json.loads(tag("data_md5") or "{}"),
            "calibration_md5": json.loads(tag("calibration_md5") or "{}"),
            "eval_md5": json.loads(tag("eval_md5") or "{}"),
            "datasets": _datasets(run),
        },
        "code": {"revision": tag("code_revision"), "fingerprint": tag("code_fingerprint")},
        "prefect": {
            "flow_run": tag("prefect_flow_run_id"),
            "deployment": tag("prefect_deployment_id"),
        },
        "metrics": release_eval_metrics(metrics, tags),
        "promotion": {
            key.removeprefix("mergeme."): value
            for key, value in sorted(tags.items())
            if key.startswith(("mergeme.promot", "mergeme.restor"))
            and key != "mergeme.promotion_checks"
        },
    }


def release_eval_metrics(metrics: dict[str, float], tags: dict[str, str]) -> dict[str, float]:
    """The released model's own eval losses, found among the run's ``eval_loss.<model>.<domain>``
    metrics: those of the one model that is not a checkpoint named in the lineage tags (the
    base and the experts are scored beside it). All eval losses when that is ambiguous."""
    losses = {k: v for k, v in metrics.items() if k.startswith("eval_loss.") and k.count(".") >= 2}
    inputs = {c["name"] for c in checkpoints_from_tags(tags)}
    models = {key.split(".")[1] for key in losses} - inputs
    if len(models) == 1:
        prefix = f"eval_loss.{models.pop()}."
        losses = {k: v for k, v in losses.items() if k.startswith(prefix)}
    return dict(sorted(losses.items()))


def flatten_lineage(lineage: dict) -> dict[str, str]:
    """``{section.key: text}`` for every leaf; checkpoints keyed by role and name."""
    flat: dict[str, str] = {}
    for section, content in lineage.items():
        if section == "checkpoints":
            for item in content:
                for key, value in item.items():
                    if key not in ("role", "name"):
                        flat[f"{item['role']}.{item['name']}.{key}"] = value
            continue
        for key, value in content.items():
            if isinstance(value, float):
                text = f"{value:.4f}"
            elif isinstance(value, (dict, list)):
                text = json.dumps(value, sort_keys=True)
            else:
                text = str(value)
            flat[f"{section}.{key}"] = text
    return flat


def diff_releases(a: dict, b: dict) -> list[tuple[str, str, str]]:
    """``(key, value in a, value in b)`` for every lineage fact that differs."""
    left, right = flatten_lineage(a), flatten_lineage(b)
    skip = {"release.version", "release.run_id", "release.source", "release.aliases"}
    keys = sorted((left.keys() | right.keys()) - skip)
    return [(k, left.get(k, "-"), right.get(k, "-")) for k in keys if left.get(k) != right.get(k)]


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_lineage(lineage: dict) -> str:
    """The lineage as readable tables, one per section."""
    release = lineage["release"]
    title = f"{release['model']} version {release['version']}"
    parts = [title, "=" * len(title)]
    checkpoints = [
        (
            c["role"],
            c["name"],
            c.get("source", ""),
            c.get("resolved", ""),
            c.get("content_hash", "")[:16],
        )
        for c in lineage["checkpoints"]
    ]
    parts += ["", _table(checkpoints, ("role", "name", "source", "resolved", "content hash"))]
    datasets = [
        (d["context"], d["name"], d["digest"], d.get("git_revision", "")[:12])
        for d in lineage["data"]["datasets"]
    ]
    if datasets:
        parts += ["", _table(datasets, ("data input", "dataset", "digest (of file md5s)", "git"))]
    rest = {k: v for k, v in lineage.items() if k != "checkpoints"}
    rest["data"] = {k: v for k, v in lineage["data"].items() if k != "datasets"}
    flat = flatten_lineage(rest)
    rows = [(key, value if len(value) <= 90 else value[:87] + "...") for key, value in flat.items()]
    parts += ["", _table(rows, ("fact", "value"))]
    return "\n".join(parts)


def format_diff(a_label: str, b_label: str, differences: list[tuple[str, str, str]]) -> str:
    if not differences:
        return f"{a_label} and {b_label} have the same lineage"
    short = [tuple(v if len(v) <= 60 else v[:57] + "..." for v in row) for row in differences]
    return _table(short, ("fact", a_label, b_label))
