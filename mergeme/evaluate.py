"""Evaluation: per-domain loss and perplexity of any causal LM, and how an MoE routes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeme.text_batches import iter_batches, token_losses

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainScore:
    model: str
    domain: str
    loss: float
    perplexity: float
    tokens: int


def load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mergeme.models  # noqa: F401  (registers mergeme's own model classes)

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=False
    ).eval()
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def score_domains(
    model,
    tokenizer,
    model_name: str,
    texts_by_domain: dict[str, list[str]],
    max_length: int,
    batch_size: int,
) -> list[DomainScore]:
    """Mean next-token loss (nats per token) and perplexity of ``model`` on each domain."""
    scores = []
    for domain, texts in texts_by_domain.items():
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in iter_batches(tokenizer, texts, max_length, batch_size):
                logits = model(**batch).logits  # (batch, tokens, vocab)
                nll, tokens = token_losses(logits, batch["input_ids"], batch["attention_mask"])
                total += nll
                count += tokens
        loss = total / max(count, 1)
        scores.append(DomainScore(model_name, domain, loss, math.exp(loss), count))
    return scores


def routing_shares(
    model, tokenizer, texts_by_domain: dict[str, list[str]], max_length: int, batch_size: int
) -> dict[str, list[float]]:
    """For each domain, the share of top-k routing slots (over all layers and real tokens)
    that went to each expert: ``{domain: [share of expert 0, share of expert 1, ...]}``.
    A sequence-routed model (no router logits) reports the share of its sequences' top-k
    slots instead."""
    from mergeme.routing.diagnostics import routing_counts, shares_from_counts

    counts = routing_counts(model, tokenizer, texts_by_domain, max_length, batch_size)
    return shares_from_counts(counts)
