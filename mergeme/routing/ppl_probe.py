"""``ppl_probe`` routers: perplexity labels from the dense experts, fitted per layer.

Every calibration text (of every domain) is labelled with the expert that, run as its own
dense model, gives it the lowest perplexity. Each layer's router then becomes a linear
classifier from that layer's router input (the merged model's own hidden states) to the
label. Layers are fitted in order: layer l sees what the fitted routers of layers < l send it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mergeme.config import ProbeSettings
from mergeme.routing.centroid import _StopForward, moe_layers
from mergeme.text_batches import iter_batches

logger = logging.getLogger(__name__)


def sequence_losses(model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean next-token NLL of every text in ``batches`` under ``model``: (texts,)."""
    losses = []
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch).logits.float()  # (batch, tokens, vocab)
            targets = batch["input_ids"][:, 1:]
            valid = batch["attention_mask"][:, 1:].float()  # (batch, tokens - 1)
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            losses.append((nll * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1))
    return torch.cat(losses)


def perplexity_labels(
    expert_paths: list[Path], texts: list[str], max_length: int, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's best expert and every expert's loss on it.

    Returns:
        ``(labels, losses)``: labels (texts,) is the argmin over experts of the mean NLL (the
        lowest perplexity); losses is (texts, experts).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    columns = []
    for path in expert_paths:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=False
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        batches = list(iter_batches(tokenizer, texts, max_length, batch_size))
        columns.append(sequence_losses(model, batches))
        del model
    losses = torch.stack(columns, dim=1)  # (texts, experts)
    return losses.argmin(dim=1), losses


def router_inputs(
    model, layer: int, batches: list[dict[str, torch.Tensor]], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real token's hidden state entering ``layer``'s MoE block, with its text's label.

    Returns:
        ``(hidden, token_labels)``: (tokens, hidden) and (tokens,).
    """
    rows, row_labels = [], []
    current: dict[str, torch.Tensor] = {}

    def capture(_module, args):
        hidden = args[0].float()  # (batch, tokens, hidden)
        mask = current["mask"].bool()  # (batch, tokens)
        rows.append(hidden[mask])
        per_token = current["labels"].unsqueeze(1).expand_as(mask)  # (batch, tokens)
        row_labels.append(per_token[mask])
        raise _StopForward

    handle = moe_layers(model)[layer].mlp.register_forward_pre_hook(capture)
    start = 0
    try:
        with torch.no_grad():
            for batch in batches:
                size = batch["input_ids"].shape[0]
                current["mask"] = batch["attention_mask"]
                current["labels"] = labels[start : start + size]
                start += size
                try:
                    model(**batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return torch.cat(rows), torch.cat(row_labels)


def fit_least_squares(
    hidden: torch.Tensor, labels: torch.Tensor, num_experts: int, ridge: float
) -> torch.Tensor:
    """Ridge regression of one-hot labels on hidden states: the weight (experts, hidden).

    Solves ``(HᵀH + ridge·n·I) W = HᵀY`` with H (n, hidden), Y (n, experts) one-hot.
    """
    hidden = hidden.double()
    targets = torch.nn.functional.one_hot(labels, num_experts).double()  # (n, experts)
    gram = hidden.T @ hidden  # (hidden, hidden)
    gram += ridge * len(hidden) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    weight = torch.linalg.solve(gram, hidden.T @ targets)  # (hidden, experts)
    return weight.T.float()


def fit_logistic(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    num_experts: int,
    steps: int,
    learning_rate: float,
    seed: int = 0,
) -> torch.Tensor:
    """Multinomial logistic regression (no bias), full-batch Adam: the weight (experts, hidden)."""
    generator = torch.Generator().manual_seed(seed)
    weight = (
        torch.randn(num_experts, hidden.shape[1], generator=generator) * 1e-3
    ).requires_grad_()
    optimiser = torch.optim.Adam([weight], lr=learning_rate)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(hidden @ weight.T, labels)
        loss.backward()
        optimiser.step()
    return weight.detach()


def ppl_probe_routers(
    model,
    tokenizer,
    texts: list[str],
    labels: torch.Tensor,
    settings: ProbeSettings,
    max_length: int,
    batch_size: int = 8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Fit, set and return every layer's router weight, (num_experts, hidden), in order.

    ``labels[t]`` is the expert of text ``texts[t]``.
    """
    batches = list(iter_batches(tokenizer, texts, max_length, batch_size))
    routers = []
    for index, layer in enumerate(moe_layers(model)):
        gate = layer.mlp.gate.weight
        hidden, token_labels = router_inputs(model, index, batches, labels)
        if settings.fit == "least_squares":
            weight = fit_least_squares(hidden, token_labels, gate.shape[0], settings.ridge)
        else:
            weight = fit_logistic(
                hidden, token_labels, gate.shape[0], settings.steps, settings.learning_rate, seed
            )
        with torch.no_grad():
            gate.copy_(weight.to(gate.dtype))
        accuracy = float(((hidden @ weight.T).argmax(dim=1) == token_labels).float().mean())
        logger.debug("layer %d: probe token accuracy %.3f", index, accuracy)
        routers.append(weight)
    return routers
