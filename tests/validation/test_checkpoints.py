"""The validate step on good and broken tiny checkpoints: every problem is named."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import torch
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


def _as_pickle(folder):
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    return tensors


def test_an_allowed_pickle_expert_is_validated_like_safetensors(tiny_family, tmp_path):
    folder = _copy(tiny_family, "math", tmp_path)
    tensors = _as_pickle(folder)
    experts = _experts(tiny_family, math=folder)

    refused = validate_checkpoints(("base", tiny_family.base), experts, tmp_path / "refused")
    assert refused.kinds == ["pickle_weights"]

    allowed = validate_checkpoints(
        ("base", tiny_family.base), experts, tmp_path / "allowed", allow_pickle=True
    )
    assert allowed.success, allowed.problems
    stats = (tmp_path / "allowed" / "tensor_stats.csv").read_text()
    assert sum(f"math,{name}," in stats for name in tensors) == len(tensors)


def test_a_nan_in_an_allowed_pickle_is_still_named(tiny_family, tmp_path):
    folder = _copy(tiny_family, "code", tmp_path)
    tensors = _as_pickle(folder)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][1, 2] = float("inf")
    torch.save(tensors, folder / "pytorch_model.bin")

    report = validate_checkpoints(
        ("base", tiny_family.base),
        _experts(tiny_family, code=folder),
        tmp_path / "r",
        allow_pickle=True,
    )
    assert not report.success
    assert any("'code'" in p and name in p and "finite" in p for p in report.problems)


def _validate_with(tiny_family, dvc_project, tmp_path, expert, validation: dict):
    from mergeme.config import load_config
    from mergeme.pipeline import fetch_step
    from mergeme.validation.step import run_validation
    from tests.conftest import write_pipeline_config

    family = replace(tiny_family, experts=_experts(tiny_family, math=expert))
    path = write_pipeline_config(tmp_path, family, dvc_project, validation=validation)
    config = load_config(path)
    fetched = fetch_step(config, tmp_path / "workspace")
    return run_validation(fetched, tmp_path / f"report-{len(validation)}", config)


def test_the_config_sets_the_largest_weight_and_the_dtypes(tiny_family, dvc_project, tmp_path):
    from mergeme.validation.gx_suite import DEFAULT_MAX_ABS_VALUE

    folder = _copy(tiny_family, "math", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    # norm vectors: left out of the task-vector measure, so the expert stays a fine-tune
    tensors["model.norm.weight"][0] = 5000.0
    norm = "model.layers.0.input_layernorm.weight"
    tensors[norm] = tensors[norm].double()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    # the defaults: 5000 is within 1e4, F64 is not allowed
    report = _validate_with(tiny_family, dvc_project, tmp_path, folder, {})
    assert report.kinds == ["dtype_not_allowed"]
    assert "can also be listed in validation.allowed_dtypes" in report.problems[0]

    # a lower limit and F64 allowed
    settings = {"max_abs_value": 1000.0, "allowed_dtypes": ["F64", "F32"]}
    report = _validate_with(tiny_family, dvc_project, tmp_path, folder, settings)
    assert report.kinds == ["stats_suite"]
    assert "'model.norm.weight' has max_abs 5000 (expected at most 1000)" in report.problems[0]
    assert "raise validation.max_abs_value" in report.problems[0]

    from mergeme.config import ValidationConfig

    assert ValidationConfig().max_abs_value == DEFAULT_MAX_ABS_VALUE
