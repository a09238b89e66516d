"""Domain scores against the model's own loss; routing shares add up."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeme.checkpoint import Checkpoint
from mergeme.config import MergeConfig
from mergeme.evaluate import routing_shares, score_domains
from mergeme.merge.moe_builder import build_moe


def test_domain_loss_equals_the_token_weighted_model_loss(tiny_family):
    model = AutoModelForCausalLM.from_pretrained(tiny_family.base).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_family.base)
    texts = ["Ann has 3 apples. Answer: 3", "def f(x):\n    return x + 1 if x else None"]

    [score] = score_domains(model, tokenizer, "base", {"mixed": texts}, 64, batch_size=2)

    # independently: transformers' own loss per text, weighted by its predicted tokens
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert score.tokens == count
    assert math.isclose(score.loss, total / count, rel_tol=1e-5)
    assert math.isclose(score.perplexity, math.exp(total / count), rel_tol=1e-5)


def test_routing_shares_match_top_k_counted_by_hand(tiny_family, tmp_path):
    experts = [Checkpoint(p, name=d) for d, p in tiny_family.experts.items()]
    build_moe(Checkpoint(tiny_family.base), experts, tmp_path / "moe", MergeConfig(seed=3))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe")
    texts = ["Ann has 3 apples.", "def f(x):\n    return x + 1 if x else None"]

    shares = routing_shares(model, tokenizer, {"d": texts}, 64, batch_size=2)

    # by hand: capture each layer's router input, route with its weight, count real tokens
    counts = torch.zeros(3)
    for text in texts:  # one text at a time: no padding to mask
        inputs: list[torch.Tensor] = []

        def capture(_module, _args, output, inputs=inputs):
            inputs.append(output[0])

        hooks = [
            layer.post_attention_layernorm.register_forward_hook(capture)
            for layer in model.model.layers
        ]
        with torch.no_grad():
            model(**tokenizer(text, return_tensors="pt"))
        for hook in hooks:
            hook.remove()
        for layer, hidden in zip(model.model.layers, inputs):
            chosen = (hidden @ layer.mlp.gate.weight.T).topk(2, dim=-1).indices
            counts += torch.bincount(chosen.reshape(-1), minlength=3)
    expected = (counts / counts.sum()).tolist()
    assert shares["d"] == pytest.approx(expected, abs=1e-6)
