"""Every shipped config loads; bad configs are refused with every problem named."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeme.config import LocalSource, MlflowSource, load_config
from mergeme.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert len(config.experts) >= 2
    # relative paths resolve against the repository root for files in configs/
    assert config.data.root == REPO / "data" / "demo"


def test_demo_config_fetches_from_the_registry():
    config = load_config(REPO / "configs" / "demo.yaml")
    assert all(isinstance(e.source, MlflowSource) for e in config.experts)
    assert config.domains() == ["code", "knowledge", "math"]


def test_all_problems_are_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
base: {source: {kind: local, path: base}}
experts:
  - {name: a, domain: x, source: {kind: local, path: a}, colour: blue}
  - {name: b, domain: y, source: {kind: mlflow, uri: "not-a-uri"}}
merge: {trunk_method: median, density: 1.5}
data: {root: data}
"""
    )
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    message = str(error.value)
    for fragment in (
        "experts.0.colour: unknown key",
        "experts.1.source.mlflow.uri",
        "merge.trunk_method",
        "merge.density",
        "registry: required key is missing",
    ):
        assert fragment in message, fragment


def test_cross_field_problems_name_their_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
base: {source: {kind: local, path: base}}
experts:
  - {name: a, domain: x, source: {kind: local, path: a}}
  - {name: a, domain: y, source: {kind: local, path: b}}
merge: {expert_weights: [1.0], experts_per_token: 3}
data: {root: data}
registry: {model_name: m}
"""
    )
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    message = str(error.value)
    assert "names must be unique" in message
    assert "merge.expert_weights: 1 weights for 2 experts" in message
    assert "merge.experts_per_token: 3 is more than the 2 experts" in message


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    good = tmp_path / "sub" / "good.yaml"
    good.parent.mkdir()
    good.write_text(
        """
base: {source: {kind: local, path: ../models/base}}
experts:
  - {name: a, domain: x, source: {kind: local, path: /abs/a}}
  - {name: b, domain: y, source: {kind: huggingface, repo_id: org/b, revision: abc}}
data: {root: data}
registry: {model_name: m}
"""
    )
    config = load_config(good)
    assert isinstance(config.base.source, LocalSource)
    assert config.base.source.path == tmp_path / "models" / "base"
    assert config.experts[0].source.path == Path("/abs/a")
    assert config.data.root == tmp_path / "sub" / "data"


def test_a_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
