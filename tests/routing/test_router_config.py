"""Router settings in the pipeline config: typed, defaulted, and checked across keys."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mergeme.config import PipelineConfig
from mergeme.routing.methods import ROUTER_METHODS


def _config(router: dict) -> dict:
    local = {"kind": "local", "path": "/nowhere"}
    return {
        "base": {"source": local},
        "experts": [{"name": n, "domain": n, "source": local} for n in ("math", "code")],
        "router": router,
        "data": {"root": "/nowhere"},
        "registry": {"model_name": "m"},
    }


@pytest.mark.parametrize("method", sorted(ROUTER_METHODS))
def test_every_method_is_selectable(method):
    config = PipelineConfig.model_validate(_config({"method": method}))
    assert config.router.method == method
    assert config.router.finetune.load_balancing_coef == 0.01
    assert config.router.sequence.top_k == 2


def test_bad_router_settings_are_all_reported_with_their_keys():
    router = {
        "method": "finetune",
        "finetune": {"scope": "experts_only", "steps": 0},
        "sequence": {"mixing": "tokens"},
    }
    with pytest.raises(ValidationError) as error:
        PipelineConfig.model_validate(_config(router))
    keys = {".".join(map(str, item["loc"])) for item in error.value.errors()}
    assert keys == {"router.finetune.scope", "router.finetune.steps", "router.sequence.mixing"}


def test_more_experts_per_sequence_than_experts_is_refused():
    with pytest.raises(ValidationError, match="router.sequence.top_k: 3 is more than the 2"):
        PipelineConfig.model_validate(_config({"sequence": {"top_k": 3}}))
