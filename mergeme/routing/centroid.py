"""Routers from calibration data: each expert's row is the normalised mean hidden state that
reaches the router on that expert's domain, optionally minus a negative mean (the other
experts' means, or a user-supplied set of negative texts).

Hidden states are taken from the merged model itself, layer by layer: layer l is calibrated
after the routers of layers 0..l-1 are set, because those routers shape what reaches layer l.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mergeme.config import NegativeTextsConfig
from mergeme.errors import DataError
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
    negative_texts: list[str] | None = None,
) -> list[torch.Tensor]:
    """Set and return every layer's router weight, (num_experts, hidden), from centroids.

    ``texts_per_expert[i]`` are the calibration texts of expert i's domain. Before
    normalising, each row is its mean minus ``negative_weight`` times: with ``negative``
    ``"other_domains"``, the mean of the other experts' means; with ``"texts"``, the mean
    router input over ``negative_texts`` (the same for every row).

    Raises:
        ValueError: ``negative`` is ``"texts"`` and ``negative_texts`` is empty.
    """
    if negative == "texts" and not negative_texts:
        raise ValueError("centroid routers with negative 'texts' need negative texts; none given")
    batches = [
        list(iter_batches(tokenizer, texts, max_length, batch_size)) for texts in texts_per_expert
    ]
    negative_batches = []
    if negative == "texts":
        negative_batches = list(iter_batches(tokenizer, negative_texts, max_length, batch_size))
    routers = []
    for index, layer in enumerate(moe_layers(model)):
        rows = [mean_router_input(model, index, expert_batches) for expert_batches in batches]
        weight = torch.stack(rows)  # (num_experts, hidden)
        if negative == "other_domains":
            weight = subtract_other_means(weight, negative_weight)
        elif negative == "texts":
            negative_mean = mean_router_input(model, index, negative_batches)  # (hidden,)
            weight = weight - negative_weight * negative_mean
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


def load_negative_texts(settings: NegativeTextsConfig) -> list[str]:
    """The first ``settings.max_texts`` texts of the negative set's file: the ``text`` field
    of each line of a ``.jsonl`` file, or each non-empty line of a ``.txt`` file.

    Raises:
        DataError: the file is missing, of another kind, malformed (naming the line), or holds
            no text.
    """
    path = Path(settings.path)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: router.centroid.negative_texts.path must name the file of "
            "negative texts"
        )
    if path.suffix not in (".jsonl", ".txt"):
        raise DataError(f"{path}: negative texts must be a .jsonl or a .txt file")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            texts.append(line)
        else:
            texts.append(_jsonl_text(path, number, line))
        if len(texts) == settings.max_texts:
            break
    if not texts:
        raise DataError(f"{path} holds no negative texts; add some or remove negative: texts")
    return texts


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str) or not text:
        raise DataError(f"{path}, line {number}: needs a non-empty string field 'text'")
    return text
