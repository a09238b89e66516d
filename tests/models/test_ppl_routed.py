"""The perplexity-routed model against its dense experts, computed independently."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mergeme.models  # noqa: F401  (registers the Auto classes)
from mergeme.config import SequenceSettings
from mergeme.errors import CheckpointError
from mergeme.models.build import build_ppl_routed
from mergeme.models.ppl_routed import PplRoutedForCausalLM

TEXT = "Ann has 3 apples and buys 4 more. Answer:"


def _dense(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _build(tiny_family, tmp_path, domains, **settings):
    paths = [tiny_family.experts[d] for d in domains]
    out = tmp_path / f"ppl-{'-'.join(domains)}-{settings.get('mixing', 'layer')}"
    build_ppl_routed(paths, out, SequenceSettings(**settings), expert_names=list(domains))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return out, model, AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("mixing", ["layer", "path"])
def test_one_expert_equals_that_expert(tiny_family, tmp_path, mixing):
    _, model, tokenizer = _build(tiny_family, tmp_path, ["code"], top_k=1, mixing=mixing)
    expert = _dense(tiny_family.experts["code"])
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expert(input_ids=ids).logits)


def _hand_weights(experts, ids):
    """softmax over 1/PPL, each PPL from the expert's own loss."""
    with torch.no_grad():
        losses = torch.tensor([e(input_ids=ids, labels=ids).loss.item() for e in experts])
    return torch.softmax(torch.exp(-losses), dim=0)


def _hand_layer_mix(experts, alphas, ids):
    """Every layer's output is the α-mix of the experts' own layers on the shared input."""
    tokens = ids.shape[1]
    mask = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None]  # (1, 1, t, t)
    positions = torch.arange(tokens)[None]
    hidden = sum(a * e.model.embed_tokens(ids) for a, e in zip(alphas, experts))
    for layer in range(experts[0].config.num_hidden_layers):
        outputs = []
        for expert in experts:
            rope = expert.model.rotary_emb(hidden, positions)
            block = expert.model.layers[layer]
            outputs.append(block(hidden, attention_mask=mask, position_embeddings=rope))
        hidden = sum(a * out for a, out in zip(alphas, outputs))
    return sum(a * e.lm_head(e.model.norm(hidden)) for a, e in zip(alphas, experts))


@pytest.mark.parametrize("mixing", ["layer", "path"])
def test_two_experts_equal_a_reference_computed_by_hand(tiny_family, tmp_path, mixing):
    domains = ["math", "knowledge"]
    _, model, tokenizer = _build(tiny_family, tmp_path, domains, top_k=2, mixing=mixing)
    experts = [_dense(tiny_family.experts[d]) for d in domains]
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]

    alphas = _hand_weights(experts, ids)
    with torch.no_grad():
        if mixing == "path":
            expected = sum(a * e(input_ids=ids).logits for a, e in zip(alphas, experts))
        else:
            expected = _hand_layer_mix(experts, alphas, ids)
        output = model(input_ids=ids)

    torch.testing.assert_close(output.routing_weights[0], alphas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.logits, expected, rtol=1e-4, atol=1e-4)


def test_top_k_keeps_the_experts_of_lowest_perplexity(tiny_family, tmp_path):
    domains = ["math", "code", "knowledge"]
    _, model, tokenizer = _build(tiny_family, tmp_path, domains, top_k=2, temperature=0.5)
    experts = [_dense(tiny_family.experts[d]) for d in domains]
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        losses = torch.tensor([e(input_ids=ids, labels=ids).loss.item() for e in experts])
        weights = model(input_ids=ids).routing_weights[0]
    kept = losses.argsort()[:2]
    assert set(weights.nonzero().flatten().tolist()) == set(kept.tolist())
    expected = torch.softmax(torch.exp(-losses[kept]) / 0.5, dim=0)
    torch.testing.assert_close(weights[kept], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixing", ["layer", "path"])
def test_generation_with_and_without_cache_agrees(tiny_family, tmp_path, mixing):
    domains = ["math", "code", "knowledge"]
    _, model, tokenizer = _build(tiny_family, tmp_path, domains, mixing=mixing)
    encoded = tokenizer(TEXT, return_tensors="pt")
    settings = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    cached = model.generate(**encoded, use_cache=True, **settings)
    uncached = model.generate(**encoded, use_cache=False, **settings)
    assert torch.equal(cached, uncached)

    # and both equal a greedy loop with the weights fixed on the prompt
    ids = encoded["input_ids"]
    with torch.no_grad():
        weights = model(input_ids=ids).routing_weights
        for _ in range(12):
            logits = model(input_ids=ids, routing_weights=weights).logits[:, -1]
            logits[:, tokenizer.eos_token_id] = -float("inf")  # as min_new_tokens does
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_save_and_load_round_trip(tiny_family, tmp_path):
    _, model, tokenizer = _build(tiny_family, tmp_path, ["math", "code"], mixing="path")
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

    folder, model, tokenizer = _build(tiny_family, tmp_path, ["math", "code", "knowledge"])
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


def test_builder_refuses_experts_with_another_depth(tiny_family, tmp_path):
    import json
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny_family.experts["math"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="odd: num_hidden_layers 3"):
        build_ppl_routed([tiny_family.experts["code"], odd], tmp_path / "out", SequenceSettings())
    assert not (tmp_path / "out").exists()
