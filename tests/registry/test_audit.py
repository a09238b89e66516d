"""Which eval metrics the audit shows: the released model's, whatever key evaluate gave it."""

from __future__ import annotations

import pytest

from mergeme.registry.audit import release_eval_metrics

TAGS = {
    "mergeme.base.base.content_hash": "a",
    "mergeme.expert.code.content_hash": "b",
    "mergeme.expert.math.content_hash": "c",
}


@pytest.mark.parametrize("model", ["moe", "tiny-moe"])
def test_the_released_models_losses_are_told_from_the_inputs(model):
    metrics = {f"eval_loss.{name}.code": 1.0 for name in ("base", "code", "math")}
    metrics |= {f"eval_loss.{model}.code": 0.5, f"eval_loss.{model}.math": 0.7}
    metrics |= {f"eval_perplexity.{model}.code": 1.6, "routing_share.code.math": 0.2}
    assert release_eval_metrics(metrics, TAGS) == {
        f"eval_loss.{model}.code": 0.5,
        f"eval_loss.{model}.math": 0.7,
    }


def test_every_eval_loss_when_the_released_model_is_ambiguous():
    metrics = {"eval_loss.a.code": 1.0, "eval_loss.b.code": 2.0, "eval_loss.base.code": 3.0}
    assert release_eval_metrics(metrics, TAGS) == metrics
