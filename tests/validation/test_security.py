"""Security defaults that hold for the whole code base."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mergeme.config import load_config
from mergeme.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_no_code_path_enables_remote_code():
    # transformers refuses auto_map checkpoints unless trust_remote_code=True is passed
    enabling = re.compile(r"trust_remote_code\s*=\s*True")
    sources = [*REPO.glob("mergeme/**/*.py"), *REPO.glob("mlflow/*.py"), *REPO.glob("tasks/*.py")]
    assert sources
    offenders = [str(path) for path in sources if enabling.search(path.read_text())]
    assert offenders == []


def test_wrong_types_name_the_key_and_the_fix_without_echoing_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
base: {source: {kind: local, path: base}}
experts:
  - {name: a, domain: x, source: {kind: local, path: a}}
  - {name: b, domain: y, source: {kind: local, path: b}}
data: {root: data, allow_uncommitted: hf_notasecretbutlooksone}
router: {max_length: long}
validation: {min_text_chars: 50, max_text_chars: 10, allow_remote_code: sure}
registry: {model_name: m}
"""
    )
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    message = str(error.value)
    assert "data.allow_uncommitted: Input should be a valid boolean" in message
    assert "write true or false" in message
    assert "router.max_length: Input should be a valid integer" in message
    assert "validation.allow_remote_code" in message
    assert "hf_notasecretbutlooksone" not in message
