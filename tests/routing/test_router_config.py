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


@pytest.mark.parametrize(
    ("centroid", "message"),
    [
        ({"negative": "texts"}, "negative_texts is required when negative is 'texts'"),
        (
            {"negative": "other_domains", "negative_texts": {"path": "/n.jsonl"}},
            "negative_texts is set but negative is 'other_domains'",
        ),
        ({"negative": "texts", "negative_texts": {}}, "Field required"),
    ],
)
def test_negative_text_settings_must_fit_together(centroid, message):
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(_config({"centroid": centroid}))


def test_a_negative_text_file_resolves_against_the_config_folder(tmp_path):
    import yaml

    from mergeme.config import load_config

    raw = _config({"method": "centroid"})
    raw["router"]["centroid"] = {"negative": "texts", "negative_texts": {"path": "neg.txt"}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "pipeline.yaml")
    assert config.router.centroid.negative_texts.path == (tmp_path / "neg.txt").resolve()


@pytest.mark.parametrize("role", ["base", "expert"])
def test_the_name_moe_is_reserved_for_the_merged_model(role):
    raw = _config({})
    if role == "base":
        raw["base"]["name"] = "moe"
    else:
        raw["experts"][0]["name"] = "moe"
    with pytest.raises(ValidationError, match="'moe' is reserved for the merged model"):
        PipelineConfig.model_validate(raw)
