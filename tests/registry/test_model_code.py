"""Checkpoints of mergeme's own model classes load through MLflow where mergeme is not
installed: the package travels with the logged model; without it the error names the type."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeme.config import SequenceSettings
from mergeme.models.build import build_ppl_routed
from mergeme.models.ppl_routed import MODEL_TYPE
from mergeme.registry.store import PYFUNC_CODE, connect, log_checkpoint_model, pip_requirements

pytestmark = pytest.mark.slow
CLEAN_LOAD = Path(__file__).with_name("clean_load.py")
PROMPT = "Ann has 3 apples and buys 4 more. Answer:"


@pytest.fixture(scope="module")
def ppl_checkpoint(tiny_family, tmp_path_factory) -> Path:
    """A perplexity-routed model (``ppl_sequence``) of the tiny experts."""
    out = tmp_path_factory.mktemp("ppl") / "checkpoint"
    paths = [tiny_family.experts[d] for d in ("math", "code")]
    build_ppl_routed(paths, out, SequenceSettings(top_k=1), expert_names=["math", "code"])
    return out


def _log(tmp_path: Path, log) -> Path:
    """Log a model with ``log()`` inside a run of a fresh store; returns it downloaded."""
    import mlflow

    connect(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    experiment = mlflow.create_experiment("code", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log()
    (tmp_path / "model").mkdir()
    return Path(
        mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model"))
    )


def _load_without_mergeme(model_dir: Path, cwd: Path) -> dict:
    [site_packages] = site.getsitepackages()
    command = [sys.executable, "-I", "-S", str(CLEAN_LOAD), site_packages, str(model_dir), PROMPT]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _greedy(checkpoint: Path) -> str:
    import mergeme.models  # noqa: F401  (registers the Auto classes here)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**encoded, max_new_tokens=6, do_sample=False)
    return tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def test_own_model_class_ships_mergeme_and_loads_without_it(ppl_checkpoint, tmp_path):
    model_dir = _log(tmp_path, lambda: log_checkpoint_model(ppl_checkpoint))
    shipped = model_dir / "code" / "mergeme"
    assert (shipped / "models" / "ppl_routed.py").is_file()
    assert not list(shipped.rglob("__pycache__"))

    result = _load_without_mergeme(model_dir, tmp_path)
    assert result["importable_before"] is False, "the subprocess could import mergeme anyway"
    assert "error" not in result, result.get("error")
    assert Path(result["mergeme_file"]).is_relative_to(model_dir / "code")
    assert result["answer"] == _greedy(ppl_checkpoint)


def test_standard_checkpoints_ship_no_code(tiny_family, tmp_path):
    model_dir = _log(tmp_path, lambda: log_checkpoint_model(tiny_family.base))
    assert not (model_dir / "code").exists()


def test_without_the_code_the_error_names_the_model_type(ppl_checkpoint, tmp_path):
    import mlflow

    # as a model logged without mergeme's code (e.g. by an older mergeme) would be
    def log_without_code():
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"checkpoint": str(ppl_checkpoint)},
            pip_requirements=pip_requirements(),
        )

    result = _load_without_mergeme(_log(tmp_path, log_without_code), tmp_path)
    assert (
        f"checkpoint model_type {MODEL_TYPE!r} is not a transformers model type"
        in (result["error"])
    )


def test_an_unknown_model_type_is_named(tiny_family, tmp_path):
    import mlflow

    checkpoint = shutil.copytree(tiny_family.base, tmp_path / "odd")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "no_such_type"}))
    model_dir = _log(tmp_path, lambda: log_checkpoint_model(checkpoint))
    with pytest.raises(RuntimeError, match="model_type 'no_such_type' is neither"):
        mlflow.pyfunc.load_model(str(model_dir))
