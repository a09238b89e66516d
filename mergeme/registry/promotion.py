"""Promotion: a release becomes the ``champion`` only if its eval metrics pass the policy
against the current champion; the replaced one stays reachable as ``previous-champion``.

Aliases are the source of truth. The legacy stage field (``Production``, ``Staging``) is set
too when asked, for readers that still use it; MLflow deprecates stages and warns.
"""

from __future__ import annotations

import getpass
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergeme.config import format_validation_error
from mergeme.errors import ConfigError, MergemeError, PromotionRefused

logger = logging.getLogger(__name__)

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "mlflow" / "promotion_policy.yaml"
LegacyStage = Literal["Production", "Staging"]
Fraction = Annotated[float, Field(ge=0.0)]
HISTORY_TAG = "mergeme.promotion_history"


class PromotionPolicy(BaseModel):
    """The rules a candidate must pass to replace the champion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric_prefix: str = Field("eval_loss.moe.", min_length=1)
    higher_is_better: bool = False
    max_domain_regression: float = Field(
        0.01, ge=0.0, description="Fraction, 0.01 = 1%; the limit of every metric not listed below."
    )
    max_regression_by_metric: dict[str, Fraction] = Field(
        default_factory=dict,
        description="Per-metric limits (full metric names) that replace max_domain_regression.",
    )
    min_average_improvement: float = Field(0.0, ge=0.0, description="Fraction of the average.")
    champion_alias: str = Field("champion", pattern=r"^[A-Za-z][\w-]*$")
    previous_alias: str = Field("previous-champion", pattern=r"^[A-Za-z][\w-]*$")

    @model_validator(mode="after")
    def _check_metric_names(self) -> PromotionPolicy:
        outside = sorted(
            n for n in self.max_regression_by_metric if not n.startswith(self.metric_prefix)
        )
        if outside:
            raise ValueError(
                f"max_regression_by_metric: {outside} do not start with metric_prefix "
                f"{self.metric_prefix!r}, so they are never compared; use full metric names "
                "such as eval_loss.moe.code"
            )
        return self

    def limit(self, metric: str) -> float:
        """The largest allowed regression of ``metric`` (a fraction)."""
        return self.max_regression_by_metric.get(metric, self.max_domain_regression)


def load_policy(path: Path | None = None) -> PromotionPolicy:
    """Load and validate a policy file (default: ``mlflow/promotion_policy.yaml``).

    Raises:
        ConfigError: the file is missing, not YAML, or fails validation (all keys listed).
    """
    path = Path(path or DEFAULT_POLICY)
    if not path.is_file():
        raise ConfigError(f"promotion policy {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return PromotionPolicy.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc


@dataclass(frozen=True)
class Check:
    name: str  # a metric name, or "average"
    candidate: float | None
    champion: float | None
    passed: bool
    detail: str


@dataclass
class PromotionResult:
    model_name: str
    version: str
    champion: str | None  # the champion before this promotion
    passed: bool
    checks: list[Check] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "promoted" if self.passed else "refused"
        lines = [f"{self.model_name} version {self.version}: {verdict}"]
        lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


def release_metrics(model_name: str, version: str, prefix: str) -> dict[str, float]:
    """The run metrics of a registered version whose names start with ``prefix``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_model_version(model_name, version)
    if not found.run_id:
        return {}
    metrics = client.get_run(found.run_id).data.metrics
    return {key: value for key, value in metrics.items() if key.startswith(prefix)}


def compare(
    candidate: dict[str, float], champion: dict[str, float], policy: PromotionPolicy
) -> list[Check]:
    """Every check of ``policy``: one per champion metric, then the average."""
    sign = -1.0 if policy.higher_is_better else 1.0  # positive change = worse
    checks = []
    for name, old in sorted(champion.items()):
        new = candidate.get(name)
        if new is None:
            checks.append(Check(name, None, old, False, "missing from the candidate's run"))
            continue
        change = sign * (new - old) / max(abs(old), 1e-12)
        limit = policy.limit(name)
        ok = change <= limit
        detail = f"{new:.4f} vs champion {old:.4f} ({change:+.2%} worse; limit {limit:.2%})"
        checks.append(Check(name, new, old, ok, detail))
    for name in sorted(set(policy.max_regression_by_metric) - set(champion)):
        detail = "named in max_regression_by_metric but the champion's run has no such metric"
        checks.append(Check(name, candidate.get(name), None, False, detail))
    shared = [name for name in champion if name in candidate]
    if shared:
        new_avg = sum(candidate[n] for n in shared) / len(shared)
        old_avg = sum(champion[n] for n in shared) / len(shared)
        gain = -sign * (new_avg - old_avg) / max(abs(old_avg), 1e-12)
        ok = gain > policy.min_average_improvement
        detail = (
            f"{new_avg:.4f} vs champion {old_avg:.4f} ({gain:+.2%} better; "
            f"needs more than {policy.min_average_improvement:.2%})"
        )
        checks.append(Check("average", new_avg, old_avg, ok, detail))
    return checks


def _current(model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def _record(model_name: str, version: str, tags: dict[str, str], event: dict) -> None:
    """Set ``tags`` (the latest facts) on the version and append ``event`` to its promotion
    history: one ``mergeme.promotion_history.NNN`` tag per event, so none is overwritten."""
    from mlflow import MlflowClient

    client = MlflowClient()
    existing = client.get_model_version(model_name, version).tags
    count = sum(1 for key in existing if key.startswith(f"{HISTORY_TAG}."))
    tags = {**tags, f"{HISTORY_TAG}.{count + 1:03d}": json.dumps(event, sort_keys=True)}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)


def promotion_history(tags: dict[str, str]) -> list[dict]:
    """The promotion events recorded on a version (oldest first)."""
    keys = sorted(key for key in tags if key.startswith(f"{HISTORY_TAG}."))
    return [json.loads(tags[key]) for key in keys]


def _event(action: str, actor: str | None, reason: str, **facts: str | None) -> dict:
    return {
        "action": action,
        "by": actor or getpass.getuser(),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "reason": reason,
        **facts,
    }


def _set_stage(model_name: str, version: str, stage: LegacyStage | None) -> None:
    if stage is None:
        return
    from mlflow import MlflowClient

    logger.warning("stage %s set for readers of the legacy field; MLflow deprecates stages", stage)
    MlflowClient().transition_model_version_stage(
        model_name, version, stage, archive_existing_versions=True
    )


def _legacy_stage(model_name: str, version: str) -> LegacyStage | None:
    from mlflow import MlflowClient

    stage = MlflowClient().get_model_version(model_name, version).current_stage
    return stage if stage in ("Production", "Staging") else None


def _candidate_metrics(model_name: str, version: str, policy: PromotionPolicy) -> dict:
    from mlflow.exceptions import MlflowException

    try:
        candidate = release_metrics(model_name, version, policy.metric_prefix)
    except MlflowException as exc:
        raise MergemeError(
            f"{model_name} version {version} is not in the registry; list versions with "
            f"`mergeme audit {model_name}@candidate` or check the name"
        ) from exc
    if not candidate:
        raise MergemeError(
            f"{model_name} version {version} has no metrics starting with "
            f"{policy.metric_prefix!r}; it cannot be compared (check metric_prefix in the policy)"
        )
    return candidate


def promote(
    model_name: str,
    version: str,
    policy: PromotionPolicy,
    reason: str = "",
    actor: str | None = None,
    stage: LegacyStage | None = None,
) -> PromotionResult:
    """Make ``version`` the champion if it passes ``policy`` against the current champion (a
    first promotion always passes; promoting the champion again only sets ``stage``); on
    refusal nothing changes.

    Raises:
        MergemeError: the version does not exist or has no metrics under the policy's prefix.
    """
    version = str(version)
    candidate = _candidate_metrics(model_name, version, policy)
    champion = _current(model_name, policy.champion_alias)
    if champion == version:
        detail = "already the champion: nothing changed"
        if stage is not None and _legacy_stage(model_name, version) != stage:
            _set_stage(model_name, version, stage)
            detail = f"already the champion: only the legacy stage was set to {stage}"
        check = Check("champion", None, None, True, detail)
        return PromotionResult(model_name, version, champion, True, [check])
    if champion is None:
        checks = [Check("champion", None, None, True, "no champion yet: first promotion")]
    else:
        old = release_metrics(model_name, champion, policy.metric_prefix)
        checks = compare(candidate, old, policy)
    result = PromotionResult(model_name, version, champion, all(c.passed for c in checks), checks)
    if not result.passed:
        logger.warning("promotion refused:\n%s", result.summary())
        return result

    # the previous champion first, so it is never unreachable
    from mlflow import MlflowClient

    client = MlflowClient()
    if champion is not None:
        client.set_registered_model_alias(model_name, policy.previous_alias, champion)
    client.set_registered_model_alias(model_name, policy.champion_alias, version)
    event = _event(
        "promoted", actor, reason or "passed the promotion policy", over=champion, stage=stage
    )
    latest = {
        "mergeme.promoted_by": event["by"],
        "mergeme.promoted_at": event["at"],
        "mergeme.promotion_reason": event["reason"],
        "mergeme.promoted_over": champion or "none",
        "mergeme.promotion_checks": json.dumps([asdict(c) for c in checks]),
    }
    _record(model_name, version, latest, event)
    _set_stage(model_name, version, stage)
    logger.info("promoted %s version %s to %s", model_name, version, policy.champion_alias)
    return result


def rollback(
    model_name: str,
    policy: PromotionPolicy,
    reason: str = "",
    actor: str | None = None,
    stage: LegacyStage | None = None,
) -> tuple[str, str]:
    """Point the champion back at the previous champion, and previous-champion at the one
    rolled back (so a rollback can itself be undone). The restored version takes ``stage``,
    or, when none is given, the legacy stage the rolled-back version held. Returns
    (restored, replaced).

    Raises:
        PromotionRefused: there is no champion or no previous champion.
    """
    from mlflow import MlflowClient

    current = _current(model_name, policy.champion_alias)
    previous = _current(model_name, policy.previous_alias)
    if current is None or previous is None:
        raise PromotionRefused(
            f"{model_name}: nothing to roll back to (champion {current}, previous champion "
            f"{previous}); promote a version first with `mergeme promote`"
        )
    stage = stage or _legacy_stage(model_name, current)
    client = MlflowClient()
    client.set_registered_model_alias(model_name, policy.champion_alias, previous)
    client.set_registered_model_alias(model_name, policy.previous_alias, current)
    reason = reason or f"rollback from version {current}"
    restored = _event("restored", actor, reason, replaced=current, stage=stage)
    latest = {
        "mergeme.restored_by": restored["by"],
        "mergeme.restored_at": restored["at"],
        "mergeme.restore_reason": reason,
    }
    _record(model_name, previous, latest, restored)
    _record(model_name, current, {}, _event("rolled_back", actor, reason, restored=previous))
    _set_stage(model_name, previous, stage)
    logger.info("rolled %s back from version %s to %s", model_name, current, previous)
    return previous, current
