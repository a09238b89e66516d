"""Every shipped config loads; bad configs are refused with every problem named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mergeme.config import LocalSource, MlflowSource, PipelineConfig, load_config
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
    assert "  - experts: names must be unique, ['a'] repeat; rename the copies" in message
    assert "  - merge.expert_weights: 1 weights for 2 experts; give one weight" in message
    assert (
        "  - merge.experts_per_token: 3 is more than the 2 experts; set it to at most 2" in message
    )
    assert "(top level)" not in message


FOUR_ERRORS = """
base: {source: {kind: local, path: base}}
experts:
  - {name: a, domain: x, source: {kind: local, path: a}}
  - {name: b, domain: y, source: {kind: local, path: b}}
merge: {density: 2, experts_per_token: 5}
data: {root: data}
validation: {min_text_chars: 50, max_text_chars: 10, allow_remote_code: sure}
registry: {model_name: m}
"""


def test_field_and_cross_field_errors_are_reported_together(tmp_path):
    # pydantic alone runs cross-field validators only when every field is valid
    bad = tmp_path / "bad.yaml"
    bad.write_text(FOUR_ERRORS)
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    lines = str(error.value).splitlines()
    assert lines[0].endswith("4 problem(s) in the configuration:")
    assert sorted(lines[1:]) == [
        "  - merge.density: Input should be less than or equal to 1; write 1.0 or less",
        "  - merge.experts_per_token: 5 is more than the 2 experts; set it to at most 2",
        "  - validation.allow_remote_code: Input should be a valid boolean, unable to interpret "
        "input; write true or false",
        "  - validation.min_text_chars: 50 is above validation.max_text_chars 10; lower "
        "min_text_chars or raise max_text_chars",
    ]


def test_a_cross_field_check_is_skipped_when_its_own_keys_are_invalid(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(FOUR_ERRORS.replace("experts_per_token: 5", "experts_per_token: many"))
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    message = str(error.value)
    assert "merge.experts_per_token: Input should be a valid integer" in message
    assert "is more than the 2 experts" not in message


def test_a_config_built_in_code_gets_the_same_cross_field_checks():
    raw = yaml.safe_load(FOUR_ERRORS)
    raw["merge"] = {"experts_per_token": 5}
    raw["validation"] = {}
    with pytest.raises(ValidationError, match="merge.experts_per_token: 5 is more than the 2"):
        PipelineConfig.model_validate(raw)
    raw["merge"], raw["validation"] = {}, {"min_text_chars": 50, "max_text_chars": 10}
    with pytest.raises(ValidationError, match="min_text_chars: 50 is above"):
        PipelineConfig.model_validate(raw)


@pytest.mark.parametrize(
    ("edit", "line"),
    [
        (
            {"experts": "one"},
            "experts: Input should be a valid list; write a list ([a, b])",
        ),
        (
            {"experts": [{"name": "a", "domain": "x", "source": {"kind": "local", "path": "a"}}]},
            "experts: List should have at least 2 items after validation, not 1; list at least "
            "2 item(s)",
        ),
        (
            {"merge": {"density": 0}},
            "merge.density: Input should be greater than 0; write a number above 0.0",
        ),
        (
            {"merge": {"trunk_method": "median"}},
            "merge.trunk_method: Input should be 'base', 'average', 'task_arithmetic', 'ties', "
            "'dare_linear' or 'dare_ties'; write one of the listed values",
        ),
        (
            {"registry": {"model_name": "my model"}},
            "registry.model_name: String should match pattern '^[\\w.-]+$'; use letters, digits, "
            "'_', '.' and '-' only",
        ),
        (
            {"base": {"source": {"kind": "ftp", "path": "x"}}},
            "base.source: Input tag 'ftp' found using 'kind' does not match any of the expected "
            "tags: 'local', 'huggingface', 'mlflow'; set it to one of the listed kinds",
        ),
        (
            {"base": {"source": {"kind": "mlflow", "uri": "runs:/abc"}}},
            "base.source.mlflow.uri: String should match pattern "
            "'^models:/[^/@]+(/\\d+|@[\\w-]+)$'; write models:/NAME/VERSION or models:/NAME@ALIAS",
        ),
    ],
)
def test_each_error_names_its_key_and_a_fix(tmp_path, edit, line):
    raw = yaml.safe_load(FOUR_ERRORS)
    raw["merge"], raw["validation"] = {}, {}
    raw.update(edit)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    assert f"  - {line}" in str(error.value).splitlines()


def test_every_error_line_carries_a_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(FOUR_ERRORS + "router: {max_length: 2, method: magic, centroid: 3}\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    from mergeme.config_checks import FALLBACK_FIX

    lines = str(error.value).splitlines()[1:]
    assert len(lines) == 7
    for line in lines:
        key, _, problem = line.removeprefix("  - ").partition(": ")
        assert key and "(top level)" not in key, line
        assert "; " in problem and FALLBACK_FIX not in problem, line


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


def test_text_bounds_must_be_ordered(tmp_path):
    raw = yaml.safe_load(FOUR_ERRORS)
    raw["merge"], raw["validation"] = {}, {"min_text_chars": 50, "max_text_chars": 10}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="min_text_chars: 50 is above validation.max_text_chars"):
        load_config(bad)
    raw["validation"] = {"min_text_chars": 10, "max_text_chars": 10}
    bad.write_text(yaml.safe_dump(raw))
    assert load_config(bad).validation.min_text_chars == 10
