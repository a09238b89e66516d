"""Register, promote, audit, diff and roll back releases: the same tests against the embedded
sqlite store and a real ``mlflow server`` over HTTP (version numbers compared as str)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergeme.cli import app
from mergeme.registry.lineage import lineage_tags
from mergeme.registry.lineage_run import DataInput, StepRecord
from mergeme.registry.promotion import load_policy, promote, promotion_history, rollback
from mergeme.registry.release import register_release
from mergeme.registry.store import connect
from tests.registry.tracking_server import mlflow_server

NAME = "lifecycle-moe"
DOMAINS = ("code", "knowledge", "math")
# eval loss per domain of releases 1, 2, 3: 2 beats 1; 3 is better on average than 2 but
# 5% worse on code, which the policy forbids
LOSSES = [
    {"code": 2.00, "knowledge": 2.00, "math": 2.00},
    {"code": 1.90, "knowledge": 1.95, "math": 1.99},
    {"code": 1.995, "knowledge": 1.50, "math": 1.50},
]


def _fetched(family, revision: int) -> list[dict]:
    items = [("base", "base", None, family.base)]
    items += [(domain, "expert", domain, path) for domain, path in family.experts.items()]
    return [
        {
            "name": name,
            "role": role,
            "domain": domain,
            "path": str(path),
            "source": f"local:{path}",
            "resolved": "local",
            "content_hash": f"{name}-hash-{revision if name == 'math' else 0}",
        }
        for name, role, domain, path in items
    ]


def _register(family, workspace: Path, index: int) -> str:
    merged = {
        "trunk_method": "average",
        "trunk_parameters": {"seed": index},
        "architecture": "mixtral",
        "experts_per_token": 2,
    }
    router = {"method": "centroid", "settings": {"seed": 0}}
    tags = lineage_tags(
        _fetched(family, index), merged, router, {"data/demo": "abc.dir"}, "rev", None
    )
    tags["mergeme.input_fingerprint"] = f"fingerprint-{index}"
    metrics = {f"eval_loss.moe.{d}": loss for d, loss in LOSSES[index].items()}
    # the base is scored beside the MoE; audit and promotion look at the MoE's losses only
    metrics |= {f"eval_loss.base.{d}": 3.0 for d in DOMAINS}
    files = {d: str(family.data / d / "calibration.jsonl") for d in DOMAINS}
    data = [DataInput("calibration", "calibration", files, "abc", {"dvc_md5": "abc.dir"})]
    release = register_release(
        workspace=workspace,
        experiment="lifecycle",
        model_name=NAME,
        alias="candidate",
        checkpoint=family.base,
        params={"index": index},
        metrics=metrics,
        artifacts=[],
        tags=tags,
        steps={"merge": StepRecord({"trunk_method": "average"}, {"tensors_written": 9.0})},
        data=data,
    )
    return release.version


@pytest.fixture(scope="module", params=["sqlite", pytest.param("http", marks=pytest.mark.server)])
def store(request, tiny_family, tmp_path_factory):
    """A tracking URI with three registered releases; yields (uri, versions)."""
    folder = tmp_path_factory.mktemp(f"store-{request.param}")
    if request.param == "sqlite":
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        connect(uri, folder)
        yield uri, [_register(tiny_family, folder, i) for i in range(3)]
        return
    with mlflow_server(folder) as uri:
        connect(uri, folder)
        yield uri, [_register(tiny_family, folder, i) for i in range(3)]


def _alias(alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    try:
        return str(MlflowClient().get_model_version_by_alias(NAME, alias).version)
    except MlflowException:
        return None


def _clear_champions() -> None:
    """No champion and no previous champion, whatever an earlier test left."""
    from mlflow import MlflowClient

    aliases = MlflowClient().get_registered_model(NAME).aliases or {}
    for alias in ("champion", "previous-champion"):
        if alias in aliases:
            MlflowClient().delete_registered_model_alias(NAME, alias)


def test_promotion_is_gated_recorded_and_reversible(store):
    from mlflow import MlflowClient

    uri, (v1, v2, v3) = store
    connect(uri, Path("."))
    _clear_champions()
    policy = load_policy()
    assert [v1, v2, v3] == ["1", "2", "3"]

    first = promote(NAME, v1, policy, reason="first release", actor="tester")
    assert first.passed and first.champion is None and _alias("champion") == v1
    assert _alias("previous-champion") is None

    second = promote(NAME, v2, policy, reason="better on all domains", stage="Production")
    assert second.passed and _alias("champion") == v2 and _alias("previous-champion") == v1
    tags = MlflowClient().get_model_version(NAME, v2).tags
    assert tags["mergeme.promotion_reason"] == "better on all domains"
    assert tags["mergeme.promoted_over"] == v1 and tags["mergeme.promoted_by"]
    assert MlflowClient().get_model_version(NAME, v2).current_stage == "Production"
    promoted = promotion_history(tags)[-1]
    assert (promoted["action"], promoted["over"], promoted["stage"]) == (
        "promoted",
        v1,
        "Production",
    )

    # worse on code by 5%: refused, the failed metric named, nothing moved
    third = promote(NAME, v3, policy)
    assert not third.passed
    failed = [check.name for check in third.checks if not check.passed]
    assert failed == ["eval_loss.moe.code"]
    assert "eval_loss.moe.code" in third.summary()
    assert _alias("champion") == v2 and _alias("previous-champion") == v1
    assert "mergeme.promoted_by" not in MlflowClient().get_model_version(NAME, v3).tags

    restored, replaced = rollback(NAME, policy, reason="incident", stage="Production")
    assert (restored, replaced) == (v1, v2)
    assert _alias("champion") == v1 and _alias("previous-champion") == v2
    assert MlflowClient().get_model_version(NAME, v1).current_stage == "Production"
    assert MlflowClient().get_model_version(NAME, v2).current_stage == "Archived"

    # a rollback can be undone; without --stage the restored version takes over the stage
    rollback(NAME, policy, reason="fixed")
    assert _alias("champion") == v2 and _alias("previous-champion") == v1
    assert MlflowClient().get_model_version(NAME, v2).current_stage == "Production"
    assert MlflowClient().get_model_version(NAME, v1).current_stage == "Archived"

    # every event stays on the version, in order; the latest facts are plain tags
    history = promotion_history(MlflowClient().get_model_version(NAME, v2).tags)
    assert [e["action"] for e in history[-3:]] == ["promoted", "rolled_back", "restored"]
    assert history[-3]["reason"] == "better on all domains" and history[-1]["reason"] == "fixed"
    v1_history = promotion_history(MlflowClient().get_model_version(NAME, v1).tags)
    assert [e["action"] for e in v1_history[-3:]] == ["promoted", "restored", "rolled_back"]


def test_audit_reads_back_the_lineage_and_run_record(store, tiny_family, tmp_path):
    from mergeme.registry.audit import release_lineage

    uri, (v1, _, _) = store
    connect(uri, Path("."))
    lineage = release_lineage(f"{NAME}/{v1}")
    assert lineage["release"]["version"] == v1
    experts = {c["name"]: c for c in lineage["checkpoints"] if c["role"] == "expert"}
    assert experts["math"]["content_hash"] == "math-hash-0"
    assert experts["code"]["source"] == f"local:{tiny_family.experts['code']}"
    assert lineage["settings"]["trunk_parameters"] == '{"seed": 0}'
    assert lineage["data"]["dvc_md5"] == {"data/demo": "abc.dir"}
    [dataset] = lineage["data"]["datasets"]
    assert (dataset["context"], dataset["digest"], dataset["dvc_md5"]) == (
        "calibration",
        "abc",
        "abc.dir",
    )
    assert lineage["metrics"] == {f"eval_loss.moe.{d}": v for d, v in LOSSES[0].items()}

    # the model card sits inside the registered model, and the step ran nested
    import mlflow

    version = mlflow.MlflowClient().get_model_version(NAME, v1)
    children = mlflow.search_runs(
        experiment_names=["lifecycle"],
        filter_string=f"tags.mlflow.parentRunId = '{version.run_id}'",
        output_format="list",
    )
    assert [run.info.run_name for run in children] == ["merge"]
    assert children[0].data.metrics["tensors_written"] == 9.0
    model = Path(
        mlflow.artifacts.download_artifacts(f"models:/{NAME}/{v1}", dst_path=str(tmp_path))
    )
    [card] = list(model.rglob("model_card.md"))
    assert "math-hash-0" in card.read_text() and "| code | 2.0000 |" in card.read_text()


@pytest.fixture
def restored_environment():
    """The CLI exports the workspace's tool variables; put the session's back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_cli_audit_json_and_diff(store, tmp_path, restored_environment):
    from mlflow import MlflowClient

    uri, (v1, v2, _) = store
    connect(uri, Path("."))
    _clear_champions()
    MlflowClient().set_registered_model_alias(NAME, "champion", v2)
    runner = CliRunner()
    workspace = ["--workspace", str(tmp_path), "--tracking-uri", uri]

    shown = runner.invoke(app, ["audit", f"{NAME}/{v1}", "--json", *workspace])
    assert shown.exit_code == 0, shown.output
    lineage = json.loads(shown.stdout)
    assert lineage["release"]["version"] == v1

    table = runner.invoke(app, ["audit", f"{NAME}/{v2}", *workspace])
    assert table.exit_code == 0 and "expert  math" in table.output

    diff = runner.invoke(app, ["diff", NAME, v1, v2, *workspace])
    assert diff.exit_code == 0, diff.output
    assert "expert.math.content_hash" in diff.output and "math-hash-1" in diff.output
    assert "metrics.eval_loss.moe.code" in diff.output
    assert "expert.code.content_hash" not in diff.output  # unchanged facts are not listed

    again = runner.invoke(app, ["promote", NAME, "--version", "@champion", *workspace])
    assert again.exit_code == 0 and "already the champion: nothing changed" in again.stdout
    staged = ["promote", NAME, "--version", "@champion", "--stage", "Staging", *workspace]
    staged = runner.invoke(app, staged)
    assert staged.exit_code == 0 and "only the legacy stage was set to Staging" in staged.stdout
    assert MlflowClient().get_model_version(NAME, v2).current_stage == "Staging"
    refused = runner.invoke(app, ["promote", NAME, "--version", "3", *workspace])
    assert refused.exit_code == 1
    assert "[FAIL] eval_loss.moe.code" in refused.stdout and "refused" in refused.stdout

    missing = runner.invoke(app, ["audit", f"{NAME}@nope", *workspace])
    assert missing.exit_code == 1 and "not in the registry" in missing.output
