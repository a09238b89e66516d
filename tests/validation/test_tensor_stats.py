"""The tensor statistics table and its Great Expectations suite, on a tiny random Llama.

The statistics are checked against numpy on the in-memory model. The GX tests share one
process-wide import (seconds) and each run one validation (a fraction of a second).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeme.checkpoint import Checkpoint
from mergeme.validation.gx_suite import SUITE_NAME, validate_tensor_stats
from mergeme.validation.tensor_stats import TENSOR_STATS_COLUMNS, tensor_stats_table

CORRUPTED_TENSOR = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A saved 2-layer Llama of width 32, and its parameters as float64 numpy arrays."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config)
    # norms start at exactly 1.0 (std 0): spread them so every statistic is exercised
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, safe_serialization=True)
    parameters = {n: t.detach().double().numpy() for n, t in model.state_dict().items()}
    return path, parameters


def _copy_with_value(source: Path, target: Path, tensor: str, value: float) -> Path:
    """``source`` with one element of ``tensor`` set to ``value``, written by safetensors."""
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    tensors = load_file(source / "model.safetensors")
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[7] = value
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _table(path: Path, expert: str = "math") -> pd.DataFrame:
    with Checkpoint(path) as checkpoint:
        return tensor_stats_table(checkpoint, expert)


# -- the table, without GX -----------------------------------------------------------------


def test_table_matches_numpy_on_the_model_parameters(tiny_llama):
    path, parameters = tiny_llama
    table = _table(path)

    assert list(table.columns) == TENSOR_STATS_COLUMNS
    assert sorted(table["tensor"]) == sorted(parameters)
    assert (table["expert"] == "math").all()
    assert (table["dtype"] == "F32").all()
    for row in table.itertuples():
        values = parameters[row.tensor]
        assert row.shape == "x".join(str(size) for size in values.shape)
        assert row.numel == values.size
        assert row.finite_fraction == 1.0
        expected = [values.mean(), values.std(), np.abs(values).max(), np.linalg.norm(values)]
        actual = [row.mean, row.std, row.max_abs, row.norm]
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7, err_msg=row.tensor)
    up_proj = table.set_index("tensor").loc[CORRUPTED_TENSOR]
    assert up_proj["shape"] == "64x32"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_values_are_left_out_of_the_statistics(tiny_llama, tmp_path, value):
    path, parameters = tiny_llama
    corrupted = _copy_with_value(path, tmp_path / "corrupted", CORRUPTED_TENSOR, value)
    row = _table(corrupted).set_index("tensor").loc[CORRUPTED_TENSOR]

    finite = np.delete(parameters[CORRUPTED_TENSOR].reshape(-1), 7)
    assert row["finite_fraction"] == pytest.approx(finite.size / (finite.size + 1))
    expected = [finite.mean(), finite.std(), np.abs(finite).max(), np.linalg.norm(finite)]
    actual = [row["mean"], row["std"], row["max_abs"], row["norm"]]
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_single_value_and_scalar_tensors_have_std_zero(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    tensors = {"one": torch.tensor([3.0]), "scalar": torch.tensor(-2.0, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    table = _table(tmp_path, "tiny").set_index("tensor")

    assert table.loc["one", ["shape", "dtype", "numel"]].tolist() == ["1", "F32", 1]
    assert table.loc["scalar", ["shape", "dtype", "numel"]].tolist() == ["scalar", "BF16", 1]
    assert table.loc["one", ["mean", "std", "max_abs", "norm"]].tolist() == [3.0, 0.0, 3.0, 3.0]
    assert table.loc["scalar", ["mean", "std", "max_abs"]].tolist() == [-2.0, 0.0, 2.0]


# -- the suite --------------------------------------------------------------------------------


def test_clean_model_passes_the_suite(tiny_llama):
    report = validate_tensor_stats(_table(tiny_llama[0]), allowed_dtypes=["F32", "BF16"])

    assert report.success, report.failures
    assert report.failures == []
    assert report.docs_index is None
    assert report.result_json["suite_name"] == SUITE_NAME
    json.dumps(report.result_json)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_tensor_fails_naming_it(tiny_llama, tmp_path, value):
    corrupted = _copy_with_value(tiny_llama[0], tmp_path / "corrupted", CORRUPTED_TENSOR, value)
    report = validate_tensor_stats(_table(corrupted), allowed_dtypes=["F32"])

    assert not report.success
    (failure,) = report.failures
    assert f"expert 'math': tensor '{CORRUPTED_TENSOR}' has finite_fraction 0.9" in failure
    assert "every value finite" in failure


def test_disallowed_dtype_fails_for_every_tensor(tiny_llama):
    table = _table(tiny_llama[0])
    report = validate_tensor_stats(table, allowed_dtypes=["BF16"])

    assert not report.success
    assert len(report.failures) == len(table)
    assert all("has dtype 'F32' (expected one of ['BF16'])" in f for f in report.failures)
    assert any(CORRUPTED_TENSOR in f for f in report.failures)


def test_every_row_check_names_the_offending_row():
    rows = [
        {"tensor": "a", "std": -1.0},
        {"tensor": "b", "numel": 0},
        {"tensor": "c", "max_abs": 2e4},
        {"tensor": "d"},
        {"tensor": "d"},
    ]
    base = {"expert": "code", "shape": "2x2", "dtype": "F32", "numel": 4, "mean": 0.0}
    base |= {"std": 1.0, "max_abs": 1.0, "finite_fraction": 1.0, "norm": 1.0}
    table = pd.DataFrame([base | row for row in rows], index=[10, 11, 12, 13, 14])
    report = validate_tensor_stats(table, allowed_dtypes=["F32"], max_abs_limit=1e4)

    assert not report.success
    assert report.failures == [
        "expert 'code': tensor 'd' appears in 2 rows (expected once per expert); tables of "
        "several checkpoints need distinct expert names",
        "expert 'code': tensor 'c' has max_abs 20000 (expected at most 10000); look for diverged "
        "training or a broken conversion, or raise validation.max_abs_value if such weights are "
        "intended",
        "expert 'code': tensor 'a' has std -1 (expected at least 0); the table is corrupt; "
        "rebuild it with tensor_stats_table",
        "expert 'code': tensor 'b' has numel 0 (expected at least 1); an empty tensor cannot be "
        "merged; re-export that checkpoint",
    ]


def test_data_docs_go_to_docs_dir_only(tiny_llama, tmp_path, monkeypatch):
    table = _table(tiny_llama[0])
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    report = validate_tensor_stats(table, allowed_dtypes=["F32"], docs_dir=work / "docs")

    assert report.success, report.failures
    assert report.docs_index == work / "docs" / "index.html"
    assert SUITE_NAME in report.docs_index.read_text()
    assert [p.name for p in work.iterdir()] == ["docs"]
    assert list(home.iterdir()) == []
