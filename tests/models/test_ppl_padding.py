"""Padded batches, routing prefixes, dtypes and devices of the perplexity-routed model: a
batch must give every row what that row gives alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from mergeme.models.ppl_routed import prompt_losses
from tests.models.ppl_helpers import TEXTS, build_family, dense, expert_losses

DOMAINS = ["math", "code", "knowledge"]


def _padded(tokenizer, side: str) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = side
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def _alone(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"]  # (1, tokens), no padding


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_losses_of_a_padded_batch_equal_each_rows_own_loss(tiny_family, side):
    expert = dense(tiny_family.experts["code"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_family.experts["code"])
    batch = _padded(tokenizer, side)
    assert not batch["attention_mask"].all()  # the texts differ in length: there is padding

    with torch.no_grad():
        losses = prompt_losses(expert, batch["input_ids"], batch["attention_mask"])
    expected = torch.cat([expert_losses([expert], _alone(tokenizer, t)) for t in TEXTS])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)


def test_prefix_scoring_keeps_each_rows_first_real_tokens(tiny_family, tmp_path):
    _, model, tokenizer = build_family(tiny_family, tmp_path, DOMAINS, prefix_tokens=5)
    experts = [dense(tiny_family.experts[d]) for d in DOMAINS]
    batch = _padded(tokenizer, "left")
    with torch.no_grad():
        output = model(**batch)

    for row, text in enumerate(TEXTS):
        prefix = _alone(tokenizer, text)[:, :5]
        torch.testing.assert_close(
            output.expert_losses[row], expert_losses(experts, prefix), rtol=1e-5, atol=1e-5
        )
        with torch.no_grad():
            alone = model(input_ids=_alone(tokenizer, text))
        torch.testing.assert_close(output.routing_weights[row], alone.routing_weights[0])


@pytest.mark.parametrize("mixing", ["layer", "path"])
def test_a_left_padded_batch_gives_each_row_its_own_logits(tiny_family, tmp_path, mixing):
    _, model, tokenizer = build_family(tiny_family, tmp_path, DOMAINS, mixing=mixing)
    batch = _padded(tokenizer, "left")
    with torch.no_grad():
        output = model(**batch)
        for row, text in enumerate(TEXTS):
            alone = model(input_ids=_alone(tokenizer, text))
            real = batch["attention_mask"][row].bool()
            torch.testing.assert_close(output.routing_weights[row], alone.routing_weights[0])
            torch.testing.assert_close(
                output.logits[row, real], alone.logits[0], rtol=1e-4, atol=1e-4
            )


@pytest.mark.parametrize("mixing", ["layer", "path"])
def test_batched_generation_with_left_padding_equals_one_prompt_at_a_time(
    tiny_family, tmp_path, mixing
):
    _, model, tokenizer = build_family(tiny_family, tmp_path, DOMAINS, mixing=mixing)
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    batch = _padded(tokenizer, "left")
    together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
    for row, text in enumerate(TEXTS):
        ids = _alone(tokenizer, text)
        alone = model.generate(input_ids=ids, **settings)[:, ids.shape[1] :]
        assert torch.equal(together[row], alone[0]), text


def test_a_bfloat16_model_runs_and_generates(tiny_family, tmp_path):
    folder, model, tokenizer = build_family(tiny_family, tmp_path, DOMAINS, mixing="layer")
    half = type(model).from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        low, full = half(input_ids=ids), model(input_ids=ids)
    assert low.logits.dtype == torch.bfloat16
    torch.testing.assert_close(low.logits.float(), full.logits, rtol=0.05, atol=0.05)
    generated = half.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mixing", ["layer", "path"])
def test_on_cuda_generation_equals_the_cpu_one(tiny_family, tmp_path, mixing):
    _, model, tokenizer = build_family(tiny_family, tmp_path, DOMAINS, mixing=mixing)
    batch = _padded(tokenizer, "left")
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    on_cpu = model.generate(**batch, **settings)
    model.to("cuda")
    on_gpu = model.generate(**{k: v.to("cuda") for k, v in batch.items()}, **settings)
    assert torch.equal(on_gpu.cpu(), on_cpu)
