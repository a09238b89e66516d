"""Security defaults that hold for the whole code base."""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from mergeme.config import load_config
from mergeme.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


SCANNED = ("mergeme", "flows", "tasks", "benchmarks", "mlflow")


def _loading_calls(path: Path) -> list[ast.Call]:
    """Every ``X.from_pretrained(...)`` and ``AutoX.from_config(...)`` call in ``path``."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        auto = isinstance(owner, ast.Name) and owner.id.startswith("Auto")
        if node.func.attr == "from_pretrained" or (node.func.attr == "from_config" and auto):
            calls.append(node)
    return calls


def test_every_load_passes_trust_remote_code_false():
    # left out, transformers treats it as undecided and asks on an interactive terminal
    sources = [path for folder in SCANNED for path in sorted((REPO / folder).rglob("*.py"))]
    offenders, checked = [], 0
    for path in sources:
        for call in _loading_calls(path):
            checked += 1
            passed = {k.arg: k.value for k in call.keywords}
            value = passed.get("trust_remote_code")
            if not (isinstance(value, ast.Constant) and value.value is False):
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert checked >= 8  # evaluate, calibrate, ppl_probe, the pyfunc model, the routed model
    assert offenders == []


def test_no_code_path_enables_remote_code():
    # nor anything that could turn it on indirectly (a variable, a **kwargs dict)
    enabling = re.compile(r"trust_remote_code\s*(=|\"\s*:)(?!\s*False\b)")
    sources = [path for folder in SCANNED for path in sorted((REPO / folder).rglob("*.py"))]
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


def _with_auto_map(source: Path, target: Path, file: str) -> Path:
    """A copy of ``source`` whose ``file`` names custom code, and that code, which would leave
    a marker file in ``target`` if it were ever imported."""
    shutil.copytree(source, target)
    # transformers imports a copy from its module cache: the marker path must be absolute
    (target / "custom_code.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(target / 'code-was-run')!r}).write_text('yes')\n"
        "from transformers import LlamaForCausalLM as CustomModel\n"
        "from transformers import PreTrainedTokenizerFast as CustomTokenizer\n"
    )
    settings = json.loads((target / file).read_text())
    entry = "custom_code.CustomModel" if file == "config.json" else ["custom_code.CustomTokenizer"]
    key = "AutoModelForCausalLM" if file == "config.json" else "AutoTokenizer"
    settings["auto_map"] = {key: entry}
    (target / file).write_text(json.dumps(settings))
    return target


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_auto_map_in_any_config_file_is_refused_or_only_warned(tiny_family, tmp_path, file, caplog):
    from mergeme.validation.files import inspect_checkpoint

    folder = _with_auto_map(tiny_family.base, tmp_path / "custom", file)
    [problem] = inspect_checkpoint("custom", folder).problems
    assert problem.kind == "remote_code"
    assert f"{folder / file} has auto_map" in problem.message
    assert "mergeme never runs such code" in problem.message
    assert "validation.allow_remote_code: true" in problem.message

    with caplog.at_level(logging.WARNING, logger="mergeme.validation.files"):
        inventory = inspect_checkpoint("custom", folder, allow_remote_code=True)
    assert inventory.problems == []
    assert "accepted by validation.allow_remote_code" in caplog.text


def test_loading_a_checkpoint_that_names_custom_code_never_runs_it(tiny_family, tmp_path):
    from mergeme.evaluate import load_causal_lm

    folder = _with_auto_map(tiny_family.base, tmp_path / "custom", "config.json")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["custom_code.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))

    model, tokenizer = load_causal_lm(folder)

    assert not (folder / "code-was-run").exists()
    assert type(model).__module__.startswith("transformers.models.llama")
    assert type(tokenizer).__module__.startswith("transformers.")
