"""The perplexity-routed model against its dense experts, computed independently: the mixing
with given weights, the weights the model picks, and generation."""

from __future__ import annotations

import math

import pytest
import torch

from mergeme.models.ppl_routed import routing_weights_from_losses
from tests.models.llama_reference import ReferenceLlama, layer_mixed_logits
from tests.models.ppl_helpers import TEXT, build_family, dense, expert_losses

# per-row weights far from equal, so a swapped or averaged α shows
WEIGHTS = torch.tensor([[0.8, 0.2], [0.3, 0.7]])


@pytest.fixture
def tokenizer_ids(tiny_family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_family.experts["math"])
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    return ids.repeat(2, 1)  # (2, tokens): one row per row of WEIGHTS


@pytest.mark.parametrize("mixing", ["layer", "path"])
def test_one_expert_equals_that_expert(tiny_family, tmp_path, mixing):
    _, model, tokenizer = build_family(tiny_family, tmp_path, ["code"], top_k=1, mixing=mixing)
    expert = dense(tiny_family.experts["code"])
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expert(input_ids=ids).logits)


def test_the_reference_llama_equals_the_dense_expert(tiny_family, tokenizer_ids):
    """The hand-written forward pass is itself right before it is used as a reference."""
    expert = dense(tiny_family.experts["math"])
    ids = tokenizer_ids
    with torch.no_grad():
        expected = expert(input_ids=ids).logits
    ours = layer_mixed_logits([ReferenceLlama(expert)], torch.ones(len(ids), 1), ids)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_layer_mixing_with_given_weights_equals_the_hand_mix(tiny_family, tmp_path, tokenizer_ids):
    domains = ["math", "knowledge"]
    _, model, _ = build_family(tiny_family, tmp_path, domains, top_k=2, mixing="layer")
    experts = [ReferenceLlama(dense(tiny_family.experts[d])) for d in domains]
    ids = tokenizer_ids

    expected = layer_mixed_logits(experts, WEIGHTS, ids)
    with torch.no_grad():
        output = model(input_ids=ids, routing_weights=WEIGHTS)
    torch.testing.assert_close(output.logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(output.routing_weights, WEIGHTS)
    # the two rows got different mixes, so the weights really reached the layers
    assert not torch.allclose(output.logits[0], output.logits[1], atol=1e-3)


def test_path_mixing_with_given_weights_is_the_mix_of_the_experts_logits(
    tiny_family, tmp_path, tokenizer_ids
):
    domains = ["math", "knowledge"]
    _, model, _ = build_family(tiny_family, tmp_path, domains, top_k=2, mixing="path")
    experts = [dense(tiny_family.experts[d]) for d in domains]
    ids = tokenizer_ids
    with torch.no_grad():
        first, second = (e(input_ids=ids).logits for e in experts)
        output = model(input_ids=ids, routing_weights=WEIGHTS)
    for row, (a, b) in enumerate(WEIGHTS.tolist()):
        expected = a * first[row] + b * second[row]
        torch.testing.assert_close(output.logits[row], expected, rtol=1e-5, atol=1e-5)


def _formula(losses: list[float], top_k: int, temperature: float) -> list[float]:
    """softmax(top-k(1/PPL) / T) with plain floats, zero outside the top-k."""
    inverse = [math.exp(-loss) for loss in losses]
    kept = sorted(range(len(losses)), key=lambda i: -inverse[i])[:top_k]
    scale = sum(math.exp(inverse[i] / temperature) for i in kept)
    return [
        math.exp(inverse[i] / temperature) / scale if i in kept else 0.0 for i in range(len(losses))
    ]


@pytest.mark.parametrize(("top_k", "temperature"), [(2, 1.0), (2, 0.1), (1, 1.0), (3, 0.5)])
def test_routing_weights_are_softmax_of_the_top_k_inverse_perplexities(top_k, temperature):
    losses = [[0.1, 2.0, 0.5, 3.0], [4.0, 0.05, 1.5, 0.7]]  # (batch, experts), nats
    weights = routing_weights_from_losses(torch.tensor(losses), top_k, temperature)
    expected = torch.tensor([_formula(row, top_k, temperature) for row in losses])
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)


def test_the_model_scores_the_prompt_with_each_experts_own_perplexity(tiny_family, tmp_path):
    domains = ["math", "code", "knowledge"]
    _, model, tokenizer = build_family(tiny_family, tmp_path, domains, top_k=2, temperature=0.5)
    experts = [dense(tiny_family.experts[d]) for d in domains]
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    losses = expert_losses(experts, ids)  # transformers' own loss of each dense expert
    with torch.no_grad():
        output = model(input_ids=ids)
    torch.testing.assert_close(output.expert_losses[0], losses, rtol=1e-5, atol=1e-6)
    expected = torch.tensor([_formula(losses.tolist(), 2, 0.5)])
    torch.testing.assert_close(output.routing_weights, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixing", ["layer", "path"])
def test_top_1_of_3_is_the_expert_of_lowest_perplexity(tiny_family, tmp_path, mixing):
    domains = ["math", "code", "knowledge"]
    _, model, tokenizer = build_family(tiny_family, tmp_path, domains, top_k=1, mixing=mixing)
    experts = [dense(tiny_family.experts[d]) for d in domains]
    for text in [TEXT, "import os\nprint(os.getcwd())"]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        best = int(expert_losses(experts, ids).argmin())
        with torch.no_grad():
            output = model(input_ids=ids)
            expected = experts[best](input_ids=ids).logits
        assert output.routing_weights[0].tolist() == [float(i == best) for i in range(3)]
        torch.testing.assert_close(output.logits, expected)


@pytest.mark.parametrize("mixing", ["layer", "path"])
def test_generation_with_and_without_cache_agrees(tiny_family, tmp_path, mixing):
    domains = ["math", "code", "knowledge"]
    _, model, tokenizer = build_family(tiny_family, tmp_path, domains, mixing=mixing)
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
