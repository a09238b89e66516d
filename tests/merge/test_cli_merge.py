"""The standalone ``mergeme merge CONFIG OUT`` command on tiny local experts."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mergeme.cli import app
from tests.factories import perturbed, random_llama, tiny_llama_config


@pytest.fixture(scope="module")
def experts_config(tmp_path_factory):
    """A pipeline config over a tiny Llama base and two fine-tunes of it."""
    root = tmp_path_factory.mktemp("cli-merge")
    base = random_llama(tiny_llama_config(), seed=1)
    base.save_pretrained(root / "base")
    for index in range(2):
        perturbed(base, seed=40 + index, scale=0.05).save_pretrained(root / f"e{index}")

    def write(name: str, **merge) -> str:
        local = {"kind": "local"}
        config = {
            "base": {"name": "base", "source": {**local, "path": str(root / "base")}},
            "experts": [
                {
                    "name": f"e{i}",
                    "domain": f"d{i}",
                    "source": {**local, "path": str(root / f"e{i}")},
                }
                for i in range(2)
            ],
            "merge": merge,
            "data": {"root": str(root / "data")},
            "registry": {"model_name": "cli-moe"},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    return write


def _merge(config: str, out, workspace) -> object:
    arguments = ["merge", config, str(out), "--workspace", str(workspace)]
    return CliRunner().invoke(app, arguments)


def test_merge_command_writes_a_loadable_moe_and_its_provenance(
    experts_config, tmp_path, session_workspace
):
    out = tmp_path / "moe"
    # a folder a killed merge left behind, and one of a merge that is still running
    dead = tmp_path / ".moe.partial-999999999-0a0a0a0a"
    running = tmp_path / f".moe.partial-{os.getpid()}-0b0b0b0b"
    dead.mkdir()
    running.mkdir()

    result = _merge(experts_config("ties", trunk_method="ties"), out, session_workspace)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{") :])["trunk_method"] == "ties"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    provenance = json.loads((out / "mergeme_merge.json").read_text())
    assert provenance["experts"] == ["e0", "e1"] and provenance["base"] == "base"
    assert not dead.exists() and running.is_dir()


def test_merge_command_reports_a_bad_config_without_a_traceback(
    experts_config, tmp_path, session_workspace
):
    config = experts_config("bad-weights", expert_weights=[1.0, 2.0, 3.0])

    result = _merge(config, tmp_path / "moe", session_workspace)

    assert result.exit_code == 1
    assert "merge.expert_weights: 3 weights for 2 experts" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
