"""The validate step on good and broken tiny checkpoints: every problem is named."""

from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file, save_file

from mergeme.validation.checkpoints import validate_checkpoints


def _copy(family, domain, tmp_path):
    target = tmp_path / domain
    shutil.copytree(family.experts[domain], target)
    return target


def _experts(family, **replaced):
    experts = dict(family.experts)
    experts.update(replaced)
    return experts


def test_the_tiny_family_is_valid(tiny_family, tmp_path):
    report = validate_checkpoints(("base", tiny_family.base), tiny_family.experts, tmp_path)
    assert report.success, report.problems
    assert (tmp_path / "validation_report.json").is_file()
    assert (tmp_path / "data_docs" / "index.html").is_file()


def test_a_nan_tensor_is_named(tiny_family, tmp_path):
    folder = _copy(tiny_family, "math", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    report = validate_checkpoints(
        ("base", tiny_family.base), _experts(tiny_family, math=folder), tmp_path / "r"
    )
    assert not report.success
    assert any("'math'" in p and name in p and "finite" in p for p in report.problems)


def test_other_vocabulary_and_tokenizer_are_named(tiny_family, tmp_path):
    folder = _copy(tiny_family, "code", tmp_path)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zzz-extra"] = 10_000
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))

    report = validate_checkpoints(
        ("base", tiny_family.base), _experts(tiny_family, code=folder), tmp_path / "r"
    )
    assert any("'code': tokenizer files differ" in p for p in report.problems)


def test_other_shapes_and_a_single_expert_are_reported_together(tiny_family, tmp_path):
    folder = _copy(tiny_family, "knowledge", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))

    report = validate_checkpoints(("base", tiny_family.base), {"knowledge": folder}, tmp_path / "r")
    assert any("at least 2" in p for p in report.problems)
    assert any("'knowledge': config.json num_hidden_layers is 1" in p for p in report.problems)


def test_a_missing_weight_tensor_is_named(tiny_family, tmp_path):
    folder = _copy(tiny_family, "math", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    report = validate_checkpoints(
        ("base", tiny_family.base), _experts(tiny_family, math=folder), tmp_path / "r"
    )
    assert "'math': tensor 'model.norm.weight' of the base is missing" in report.problems
