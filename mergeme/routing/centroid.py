"""Routers from calibration data: each expert's row is the normalised mean hidden state that
reaches the router on that expert's domain.

Hidden states are taken from the merged model itself, layer by layer: layer l is calibrated
after the routers of layers 0..l-1 are set, because those routers shape what reaches layer l.
"""

from __future__ import annotations

import logging

import torch

from mergeme.text_batches import iter_batches

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once the layer of interest has been reached."""


def moe_layers(model) -> list:
    return list(model.model.layers)


def mean_router_input(model, layer: int, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean over real tokens of the hidden state entering ``layer``'s MoE block: (hidden,)."""
    total: torch.Tensor | None = None
    count = 0
    mask_holder: dict[str, torch.Tensor] = {}

    def capture(_module, args):
        nonlocal total, count
        hidden = args[0].float()  # (batch, tokens, hidden)
        mask = mask_holder["mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
        summed = (hidden * mask).sum(dim=(0, 1))
        total = summed if total is None else total + summed
        count += int(mask.sum().item())
        raise _StopForward

    handle = moe_layers(model)[layer].mlp.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for batch in batches:
                mask_holder["mask"] = batch["attention_mask"]
                try:
                    model(**batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if total is None or count == 0:
        raise ValueError(f"no calibration tokens reached layer {layer}")
    return total / count


def centroid_routers(
    model,
    tokenizer,
    texts_per_expert: list[list[str]],
    max_length: int,
    batch_size: int = 8,
    negative: str = "none",
    negative_weight: float = 1.0,
) -> list[torch.Tensor]:
    """Set and return every layer's router weight, (num_experts, hidden), from centroids.

    ``texts_per_expert[i]`` are the calibration texts of expert i's domain. With ``negative``
    set to ``"other_domains"``, each row is its mean minus ``negative_weight`` times the mean
    of the other experts' means, before normalising.
    """
    batches = [
        list(iter_batches(tokenizer, texts, max_length, batch_size)) for texts in texts_per_expert
    ]
    routers = []
    for index, layer in enumerate(moe_layers(model)):
        rows = [mean_router_input(model, index, expert_batches) for expert_batches in batches]
        weight = torch.stack(rows)  # (num_experts, hidden)
        if negative == "other_domains":
            weight = subtract_other_means(weight, negative_weight)
        weight = weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        gate = layer.mlp.gate.weight
        with torch.no_grad():
            gate.copy_(weight.to(gate.dtype))
        routers.append(weight)
        cosine = weight @ weight.T
        off_diagonal = cosine - torch.eye(len(rows), device=weight.device)
        logger.debug("layer %d: max cosine between router rows %.3f", index, off_diagonal.max())
    return routers


def subtract_other_means(means: torch.Tensor, scale: float) -> torch.Tensor:
    """Each row minus ``scale`` times the mean of the other rows: (num_experts, hidden)."""
    count = means.shape[0]
    others = (means.sum(dim=0, keepdim=True) - means) / max(count - 1, 1)
    return means - scale * others
