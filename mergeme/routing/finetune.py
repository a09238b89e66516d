"""``finetune``: train an MoE's routers (or routers and trunk, or everything) with the
language-modelling loss plus a load-balancing loss, as in Branch-Train-MiX.

The load-balancing loss of one layer is ``N · Σᵢ uᵢ·pᵢ``: uᵢ is the share of real tokens whose
top-k includes expert i, pᵢ the mean router probability of expert i. It is summed over
layers and scaled by the coefficient α (0.01 by default).
"""

from __future__ import annotations

import logging
import random
import sys

import torch
from tqdm import tqdm

from mergeme.config import FinetuneSettings
from mergeme.text_batches import iter_batches

logger = logging.getLogger(__name__)


def layer_balance_loss(logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None):
    """``N · Σᵢ uᵢ·pᵢ`` for one layer's router logits (tokens, experts); ``mask`` (tokens,)
    marks the real tokens. Gradients flow through pᵢ only (uᵢ counts discrete choices)."""
    num_experts = logits.shape[-1]
    weights = (
        torch.ones(logits.shape[0], device=logits.device) if mask is None else mask.float()
    )  # (tokens,)
    probs = torch.softmax(logits.float(), dim=-1)  # (tokens, experts)
    chosen = probs.topk(top_k, dim=-1).indices  # (tokens, top_k)
    in_top_k = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # (tokens, experts)
    total = weights.sum().clamp_min(1)
    share = (in_top_k * weights[:, None]).sum(0) / total  # uᵢ: (experts,)
    mean_prob = (probs * weights[:, None]).sum(0) / total  # pᵢ: (experts,)
    return num_experts * (share * mean_prob).sum()


def load_balancing_loss(router_logits, top_k: int, mask: torch.Tensor | None = None):
    """The sum over layers of :func:`layer_balance_loss`; ``router_logits`` holds one
    (tokens, experts) tensor per layer."""
    return sum(layer_balance_loss(logits, top_k, mask) for logits in router_logits)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens; logits (batch, tokens, vocab)."""
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
    )


def trainable_names(model, scope: str) -> list[str]:
    """Parameter names that ``scope`` trains: routers only, routers and trunk, or all."""
    names = []
    for name, _ in model.named_parameters():
        is_router = name.endswith(".mlp.gate.weight")
        is_expert = ".mlp.experts." in name
        if scope == "all" or is_router or (scope == "routers_and_trunk" and not is_expert):
            names.append(name)
    return names


def _log_to_active_run(step: int, values: dict[str, float]) -> None:
    mlflow = sys.modules.get("mlflow")  # a run can only be active if MLflow is imported
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_metrics(values, step=step)


def finetune_moe(
    model,
    tokenizer,
    texts_per_expert: list[list[str]],
    settings: FinetuneSettings,
    max_length: int,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Train ``model`` in place for ``settings.steps`` steps on the mixed texts.

    Returns:
        The loss curves, one value per step: ``lm_loss``, ``load_balancing_loss``, ``loss``.
        They are also logged as step metrics when an MLflow run is active.

    Raises:
        ValueError: there are no texts to train on.
    """
    texts = [text for texts in texts_per_expert for text in texts]
    if not texts:
        raise ValueError("finetune: no training texts; check router.finetune.split")
    names = set(trainable_names(model, settings.scope))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    params = [param for name, param in model.named_parameters() if name in names]
    optimiser = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    top_k = model.config.num_experts_per_tok
    shuffler = random.Random(seed)
    curves: dict[str, list[float]] = {"lm_loss": [], "load_balancing_loss": [], "loss": []}

    model.train()
    order: list[str] = []
    for step in tqdm(range(settings.steps), desc=f"finetuning {settings.scope}", unit="step"):
        # an endless shuffled stream of the mixed domains
        if len(order) < settings.batch_size:
            order += shuffler.sample(texts, len(texts))
        chunk, order = order[: settings.batch_size], order[settings.batch_size :]
        batch = next(iter_batches(tokenizer, chunk, max_length, len(chunk)))

        outputs = model(**batch, output_router_logits=True)
        mask = batch["attention_mask"].reshape(-1)
        language = lm_loss(outputs.logits, batch["input_ids"], batch["attention_mask"])
        balance = load_balancing_loss(outputs.router_logits, top_k, mask)
        loss = language + settings.load_balancing_coef * balance
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

        values = {"lm_loss": language.item(), "load_balancing_loss": balance.item()}
        values["loss"] = loss.item()
        for key, value in values.items():
            curves[key].append(value)
        _log_to_active_run(step, {f"finetune.{k}": v for k, v in values.items()})
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    logger.info("finetuned %s for %d steps: final loss %.4f", settings.scope, step + 1, loss.item())
    return curves
