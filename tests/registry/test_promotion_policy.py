"""The promotion policy file and its comparison rules, without a registry."""

from __future__ import annotations

import pytest

from mergeme.errors import ConfigError
from mergeme.registry.promotion import DEFAULT_POLICY, PromotionPolicy, compare, load_policy

CHAMPION = {"eval_loss.moe.code": 2.0, "eval_loss.moe.math": 1.0}


def test_shipped_policy_loads():
    policy = load_policy(DEFAULT_POLICY)
    assert policy.max_domain_regression == 0.01 and policy.champion_alias == "champion"
    assert policy.max_regression_by_metric == {}


def test_bad_policy_lists_every_bad_key(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("max_domain_regression: -1\nmetric_prefx: eval_loss.\n")
    with pytest.raises(ConfigError) as error:
        load_policy(path)
    assert "max_domain_regression" in str(error.value) and "metric_prefx" in str(error.value)


@pytest.mark.parametrize(
    "candidate, failed",
    [
        ({"eval_loss.moe.code": 1.9, "eval_loss.moe.math": 1.0}, []),
        # within 1% on code, better on average: passes
        ({"eval_loss.moe.code": 2.019, "eval_loss.moe.math": 0.9}, []),
        # 1.5% worse on code although better on average
        ({"eval_loss.moe.code": 2.03, "eval_loss.moe.math": 0.5}, ["eval_loss.moe.code"]),
        # nothing worse, but not better on average either
        ({"eval_loss.moe.code": 2.0, "eval_loss.moe.math": 1.0}, ["average"]),
        ({"eval_loss.moe.code": 1.5}, ["eval_loss.moe.math"]),
    ],
)
def test_compare_names_the_failed_checks(candidate, failed):
    checks = compare(candidate, CHAMPION, PromotionPolicy())
    assert [check.name for check in checks if not check.passed] == failed


def test_higher_is_better_flips_the_direction():
    policy = PromotionPolicy(metric_prefix="accuracy.", higher_is_better=True)
    champion = {"accuracy.code": 0.50}
    assert all(c.passed for c in compare({"accuracy.code": 0.60}, champion, policy))
    worse = compare({"accuracy.code": 0.40}, champion, policy)
    assert [c.name for c in worse if not c.passed] == ["accuracy.code", "average"]


def test_per_metric_limits_replace_the_default_for_their_metric():
    # 1.5% worse on code, better on average: fails under the 1% default ...
    candidate = {"eval_loss.moe.code": 2.03, "eval_loss.moe.math": 0.5}
    default = PromotionPolicy()
    assert [c.name for c in compare(candidate, CHAMPION, default) if not c.passed] == [
        "eval_loss.moe.code"
    ]
    # ... passes where code may be 2% worse
    looser = PromotionPolicy(max_regression_by_metric={"eval_loss.moe.code": 0.02})
    assert all(c.passed for c in compare(candidate, CHAMPION, looser))
    assert "limit 2.00%" in compare(candidate, CHAMPION, looser)[0].detail
    # math may not get worse at all, though 0.5% is within the default
    strict = PromotionPolicy(max_regression_by_metric={"eval_loss.moe.math": 0.0})
    slightly = {"eval_loss.moe.code": 1.5, "eval_loss.moe.math": 1.005}
    assert all(c.passed for c in compare(slightly, CHAMPION, default))
    assert [c.name for c in compare(slightly, CHAMPION, strict) if not c.passed] == [
        "eval_loss.moe.math"
    ]


def test_a_per_metric_limit_for_an_unknown_metric_fails_the_check():
    policy = PromotionPolicy(max_regression_by_metric={"eval_loss.moe.cod": 0.02})  # a typo
    checks = compare({"eval_loss.moe.code": 1.0, "eval_loss.moe.math": 0.5}, CHAMPION, policy)
    [failed] = [c for c in checks if not c.passed]
    assert failed.name == "eval_loss.moe.cod" and "champion's run has no such metric" in (
        failed.detail
    )


def test_bad_per_metric_limits_are_named(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("max_regression_by_metric:\n  eval_loss.moe.code: -0.1\n")
    with pytest.raises(ConfigError, match="max_regression_by_metric.eval_loss.moe.code"):
        load_policy(path)
    path.write_text("max_regression_by_metric:\n  accuracy.code: 0.1\n")
    with pytest.raises(ConfigError, match=r"\['accuracy.code'\] do not start with metric_prefix"):
        load_policy(path)
