"""Tokenised batches of texts for scoring and calibration."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def iter_batches(
    tokenizer, texts: list[str], max_length: int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of ``input_ids`` and ``attention_mask``, each (batch, tokens)."""
    ensure_pad_token(tokenizer)
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor):
    """Summed next-token NLL and the number of predicted tokens.

    logits: (batch, tokens, vocab); input_ids, mask: (batch, tokens).
    """
    targets = input_ids[:, 1:]
    valid = mask[:, 1:].bool()
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (batch, tokens - 1)
    return nll[valid].sum().item(), int(valid.sum().item())
