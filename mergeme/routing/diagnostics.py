"""Routing diagnostics: where each eval domain's tokens (or sequences) go, how balanced the
routers are, which experts receive nothing, and how well conditioned the router matrices are.

``write_routing_diagnostics`` writes them as files (tables and a heatmap PNG) for the
register step to log as MLflow artifacts, and returns their numbers as metrics.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from mergeme.text_batches import iter_batches

logger = logging.getLogger(__name__)

SEQUENCE_ROUTED_TYPES = ("mergeme_ppl_moe",)


def condition_number(weight: torch.Tensor) -> float:
    """Largest over smallest singular value of a router matrix (experts, hidden); inf when
    rows are linearly dependent."""
    values = torch.linalg.svdvals(weight.double())
    smallest = float(values.min())
    return float(values.max()) / smallest if smallest > 0 else math.inf


# what to try when a method's router rows come out nearly parallel
CONDITION_HINTS = {
    "centroid": "try router.centroid.negative: other_domains or texts, or another router method",
    "ppl_probe": "check probe_label_counts in the calibration report (the labels may be one "
    "expert's), give more calibration texts, or try router.probe.fit: least_squares",
    "finetune": "train for more steps, raise router.finetune.load_balancing_coef, or start "
    "from another router.finetune.init",
    "random": "draw with another router.seed, or calibrate with centroid or ppl_probe",
}


def warn_on_ill_conditioned(
    conditions: list[float], limit: float, method: str = "centroid"
) -> list[int]:
    """Log a warning for every layer whose router condition number exceeds ``limit``
    (near-parallel rows route alike), with a hint fitting router ``method``; returns those
    layers."""
    bad = [layer for layer, value in enumerate(conditions) if value > limit]
    hint = CONDITION_HINTS.get(method, "try another router method")
    for layer in bad:
        logger.warning(
            "layer %d: router condition number %.1f > %.1f (router.centroid."
            "max_condition_number); its expert rows are nearly parallel, so the router "
            "barely tells the experts apart (%s router: %s)",
            layer,
            conditions[layer],
            limit,
            method,
            hint,
        )
    return bad


def num_experts_of(config) -> int:
    for key in ("num_local_experts", "num_experts"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"model_type {config.model_type!r} names no expert count")


def is_sequence_routed(model) -> bool:
    return model.config.model_type in SEQUENCE_ROUTED_TYPES


def routing_counts(
    model, tokenizer, texts_by_domain: dict[str, list[str]], max_length: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """Top-k routing slots per domain: ``{domain: (layers, experts)}`` counts over real tokens
    for a token-routed MoE; ``{domain: (1, experts)}`` counts over sequences for a
    sequence-routed model."""
    counts = {}
    for domain, texts in texts_by_domain.items():
        parts = []
        with torch.no_grad():
            for batch in iter_batches(tokenizer, texts, max_length, batch_size):
                parts.append(_batch_counts(model, batch))
        counts[domain] = torch.stack(parts).sum(0)
    return counts


def _batch_counts(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    num_experts = num_experts_of(model.config)
    if is_sequence_routed(model):
        weights = model(**batch).routing_weights  # (batch, experts), zero where not chosen
        return (weights > 0).sum(0, keepdim=True).float()  # (1, experts)
    top_k = model.config.num_experts_per_tok
    outputs = model(**batch, output_router_logits=True)
    real = batch["attention_mask"].reshape(-1).bool()  # (batch * tokens,)
    rows = []
    for logits in outputs.router_logits:  # one (batch * tokens, experts) per layer
        chosen = logits[real].topk(top_k, dim=-1).indices
        rows.append(torch.bincount(chosen.reshape(-1), minlength=num_experts).float())
    return torch.stack(rows)  # (layers, experts)


def shares_from_counts(counts: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Each domain's share of routing slots per expert, over all layers."""
    return {d: (c.sum(0) / c.sum().clamp_min(1)).tolist() for d, c in counts.items()}


def balance_by_layer(counts: dict[str, torch.Tensor]) -> list[dict]:
    """Per layer (all domains together): entropy of the slot distribution in nats, the same
    divided by log(experts), and the experts that received no slot."""
    total = torch.stack(list(counts.values())).sum(0)  # (layers, experts)
    rows = []
    for layer, row in enumerate(total):
        share = row / row.sum().clamp_min(1)
        entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
        idle = [index for index, value in enumerate(row.tolist()) if value == 0]
        rows.append(
            {
                "layer": layer,
                "entropy": entropy,
                "normalised_entropy": entropy / math.log(len(row)) if len(row) > 1 else 1.0,
                "idle_experts": " ".join(map(str, idle)),
            }
        )
    return rows


def write_routing_diagnostics(
    counts: dict[str, torch.Tensor],
    expert_names: list[str],
    folder: Path,
    calibration: dict | None = None,
) -> tuple[list[str], dict[str, float]]:
    """Write the share table, heatmap PNG, balance table and (given a calibration report)
    router condition table into ``folder``.

    Returns:
        ``(files, metrics)``: the written paths and ``routing_entropy.layer_<l>``,
        ``routing_idle_experts.layer_<l>`` and ``router_condition.layer_<l>`` metrics.
    """
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    shares = shares_from_counts(counts)
    table = pd.DataFrame(shares, index=expert_names).T.rename_axis("domain")
    files = [folder / "routing_shares_by_domain.csv", folder / "routing_heatmap.png"]
    table.to_csv(files[0])
    unit = "sequences" if len(next(iter(counts.values()))) == 1 else "token slots"
    plot_heatmap(table, files[1], f"share of each domain's {unit} per expert")

    balance = balance_by_layer(counts)
    files.append(folder / "routing_balance.csv")
    pd.DataFrame(balance).to_csv(files[-1], index=False)
    metrics = {f"routing_entropy.layer_{r['layer']}": r["normalised_entropy"] for r in balance}
    metrics |= {
        f"routing_idle_experts.layer_{r['layer']}": float(len(r["idle_experts"].split()))
        for r in balance
    }
    for row in balance:
        if row["idle_experts"]:
            logger.warning(
                "layer %d: experts %s received nothing", row["layer"], row["idle_experts"]
            )

    conditions = (calibration or {}).get("condition_numbers") or []
    if conditions:
        cosines = calibration.get("max_cosine_between_rows") or [math.nan] * len(conditions)
        condition_table = pd.DataFrame(
            {"layer": range(len(conditions)), "condition_number": conditions, "max_cosine": cosines}
        )
        files.append(folder / "router_condition.csv")
        condition_table.to_csv(files[-1], index=False)
        metrics |= {f"router_condition.layer_{i}": float(v) for i, v in enumerate(conditions)}
    return [str(path) for path in files], metrics


def plot_heatmap(table, path: Path, title: str) -> None:
    """A domain × expert heatmap of shares with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1.4 * table.shape[1] + 2, 0.7 * table.shape[0] + 1.6))
    image = axes.imshow(table.values, vmin=0.0, vmax=1.0, cmap="viridis")
    axes.set_xticks(range(table.shape[1]), labels=list(table.columns))
    axes.set_yticks(range(table.shape[0]), labels=list(table.index))
    axes.set_xlabel("expert")
    axes.set_ylabel("eval domain")
    for row in range(table.shape[0]):
        for column in range(table.shape[1]):
            value = table.values[row, column]
            colour = "black" if value > 0.6 else "white"
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", color=colour)
    figure.colorbar(image, ax=axes)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
