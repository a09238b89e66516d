"""Writing, saving and loading perplexity-routed checkpoints, and which experts they accept."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeme.config import SequenceSettings
from mergeme.errors import CheckpointError
from mergeme.models.build import build_ppl_routed
from mergeme.models.ppl_routed import PplRoutedForCausalLM
from tests.factories import random_llama, tiny_llama_config
from tests.models.ppl_helpers import TEXT, build, build_family, dense


def test_save_and_load_round_trip(tiny_family, tmp_path):
    _, model, tokenizer = build_family(tiny_family, tmp_path, ["math", "code"], mixing="path")
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert isinstance(loaded, PplRoutedForCausalLM)
    assert loaded.config.mixing == "path" and loaded.config.expert_names == ["math", "code"]
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.slow
def test_mlflow_log_and_load_round_trip(tiny_family, tmp_path):
    import mlflow
    from mergeme.registry.store import log_checkpoint_model

    folder, model, tokenizer = build_family(tiny_family, tmp_path, ["math", "code", "knowledge"])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("ppl", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_checkpoint_model(folder)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    [answer] = loaded.predict({"prompt": [TEXT]}, params={"max_new_tokens": 6})

    encoded = tokenizer(TEXT, return_tensors="pt")
    generated = model.generate(**encoded, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(
        generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert answer == expected


def _other_shape_expert(tiny_family, folder, seed=7, **shape):
    """A random Llama of another depth or width that shares the family's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_family.base)
    reference = json.loads((tiny_family.base / "config.json").read_text())
    keys = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
    config = tiny_llama_config(**{k: reference[k] for k in keys}, **shape)
    random_llama(config, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_path_mixing_accepts_experts_of_other_depth_and_width(tiny_family, tmp_path):
    deep = _other_shape_expert(tiny_family, tmp_path / "deep", num_hidden_layers=3)
    wide = _other_shape_expert(
        tiny_family, tmp_path / "wide", hidden_size=48, num_attention_heads=4, head_dim=12
    )
    paths = [tiny_family.experts["math"], deep, wide]
    model, tokenizer = build(paths, tmp_path / "ppl", mixing="path", top_k=2)
    assert [e.config.num_hidden_layers for e in model.experts] == [2, 3, 2]

    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    weights = torch.tensor([[0.1, 0.6, 0.3]])
    with torch.no_grad():
        output = model(input_ids=ids, routing_weights=weights)
        expected = sum(a * dense(p)(input_ids=ids).logits for a, p in zip(weights[0], paths))
    torch.testing.assert_close(output.logits, expected, rtol=1e-5, atol=1e-5)

    # and it generates, with its own cache per expert
    generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


@pytest.mark.parametrize(
    ("shape", "key"),
    [({"num_hidden_layers": 3}, "num_hidden_layers 3"), ({"hidden_size": 48}, "hidden_size 48")],
)
def test_layer_mixing_refuses_experts_of_other_depth_or_width(tiny_family, tmp_path, shape, key):
    extra = {"head_dim": 12} if "hidden_size" in shape else {}
    odd = _other_shape_expert(tiny_family, tmp_path / "odd", **shape, **extra)
    paths = [tiny_family.experts["code"], odd]
    with pytest.raises(CheckpointError, match=f"odd: {key} differs .*use mixing 'path'"):
        build_ppl_routed(paths, tmp_path / "out", SequenceSettings(mixing="layer"))
    assert not (tmp_path / "out").exists()


def test_every_mixing_refuses_another_vocabulary(tiny_family, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_family.experts["math"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "vocab_size": 999}))
    for mixing in ("layer", "path"):
        with pytest.raises(CheckpointError, match="odd: vocab_size 999 differs"):
            build_ppl_routed(
                [tiny_family.experts["code"], odd],
                tmp_path / "out",
                SequenceSettings(mixing=mixing),
            )
    assert not (tmp_path / "out").exists()
