"""Routing quality on the demo experts: eval loss per domain, routing share to the matching
expert, and the gap to the oracle (each domain scored by its own dense expert).

For every trunk method × router method (token-level MoE) and for the perplexity-routed
model, prints one table. Run from anywhere:

    python benchmarks/routing_quality.py [--data DIR] [--experts DIR] [--finetune-steps N]

The experts folder holds ``base`` and one folder per domain (``math``, ``code``,
``knowledge``); the data folder holds ``<domain>/{train,calibration,eval}.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mergeme, whatever is installed
DOMAINS = ("math", "code", "knowledge")


@dataclass
class Row:
    trunk: str
    router: str
    losses: dict[str, float]
    shares: dict[str, float]  # share of a domain's tokens (sequences) whose top-k has its expert
    weights: dict[str, float]  # the own expert's mean mixing weight
    seconds: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    parser.add_argument("--experts", type=Path, default=REPO / "data" / "experts")
    parser.add_argument("--trunks", default="average,ties,dare_ties")
    parser.add_argument("--routers", default="random,centroid,ppl_probe,finetune")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--calibration-texts", type=int, default=64)
    parser.add_argument("--eval-texts", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Scratch folder (default: temp).")
    return parser.parse_args()


def load_split(data: Path, split: str, limit: int) -> dict[str, list[str]]:
    """The first ``limit`` texts of each domain's split (the ``text`` field of each line)."""
    texts = {}
    for domain in DOMAINS:
        lines = (data / domain / f"{split}.jsonl").read_text().splitlines()
        texts[domain] = [json.loads(line)["text"] for line in lines[:limit] if line.strip()]
    return texts


def measure(folder: Path, texts: dict[str, list[str]], max_length: int, own: dict[str, int]):
    """Per-domain eval loss, the share of tokens (sequences) whose top-k includes the
    domain's own expert, and the own expert's mean mixing weight (both averaged over layers),
    from one forward pass per batch.

    Returns:
        ``(losses, in_top_k, own_weight)``, each ``{domain: value}`` (the last two empty
        without ``own``).
    """
    from mergeme.evaluate import load_causal_lm
    from mergeme.routing.diagnostics import is_sequence_routed
    from mergeme.text_batches import iter_batches, token_losses

    model, tokenizer = load_causal_lm(folder)
    losses, in_top_k, own_weight = {}, {}, {}
    for domain, domain_texts in texts.items():
        total, count, stats = 0.0, 0, torch.zeros(3)
        for batch in iter_batches(tokenizer, domain_texts, max_length, batch_size=16):
            with torch.no_grad():
                extra = (
                    {} if not own or is_sequence_routed(model) else {"output_router_logits": True}
                )
                outputs = model(**batch, **extra)
            nll, tokens = token_losses(outputs.logits, batch["input_ids"], batch["attention_mask"])
            total, count = total + nll, count + tokens
            if own:
                stats += _own_expert_stats(model, outputs, batch, own[domain])
        losses[domain] = total / count
        if own:
            in_top_k[domain] = float(stats[1] / stats[0])
            own_weight[domain] = float(stats[2] / stats[0])
    return losses, in_top_k, own_weight


def _own_expert_stats(model, outputs, batch, own: int) -> torch.Tensor:
    """(routing decisions, decisions whose top-k has ``own``, summed weight of ``own``): (3,).
    A decision is one (token, layer) for token routing, one sequence for sequence routing."""
    from mergeme.routing.diagnostics import is_sequence_routed

    if is_sequence_routed(model):
        weights = outputs.routing_weights[:, own]  # (batch,)
        return torch.tensor([len(weights), float((weights > 0).sum()), float(weights.sum())])
    real = batch["attention_mask"].reshape(-1).bool()
    top_k = model.config.num_experts_per_tok
    stats = torch.zeros(3)
    for logits in outputs.router_logits:  # one (batch * tokens, experts) per layer
        top = torch.softmax(logits[real].float(), dim=-1).topk(top_k, dim=-1)
        weights = top.values / top.values.sum(-1, keepdim=True)  # Mixtral's renormalisation
        is_own = top.indices == own  # (tokens, top_k)
        stats += torch.tensor(
            [len(is_own), float(is_own.any(-1).sum()), float((weights * is_own).sum())]
        )
    return stats


def token_level_rows(args, scratch, calibration, train, evaluation) -> list[Row]:
    from mergeme.checkpoint import Checkpoint
    from mergeme.config import FinetuneSettings, MergeConfig, RouterConfig
    from mergeme.merge.moe_builder import build_moe
    from mergeme.routing.calibrate import calibrate_routers

    paths = [args.experts / domain for domain in DOMAINS]
    own = {domain: index for index, domain in enumerate(DOMAINS)}
    rows = []
    for trunk in args.trunks.split(","):
        merged = scratch / f"moe-{trunk}"
        base = Checkpoint(args.experts / "base")
        experts = [Checkpoint(path, name=path.name) for path in paths]
        build_moe(base, experts, merged, MergeConfig(trunk_method=trunk))
        for checkpoint in [base, *experts]:
            checkpoint.close()
        for method in args.routers.split(","):
            start = time.perf_counter()
            finetune = FinetuneSettings(
                steps=args.finetune_steps, learning_rate=args.finetune_lr, batch_size=8
            )
            settings = RouterConfig(method=method, max_length=args.max_length, finetune=finetune)
            out = scratch / f"{trunk}-{method}"
            calibrate_routers(
                merged,
                out,
                [calibration[d] for d in DOMAINS],
                settings,
                expert_paths=paths,
                train_texts_per_expert=[train[d] for d in DOMAINS],
            )
            losses, shares, weights = measure(out, evaluation, args.max_length, own)
            seconds = time.perf_counter() - start
            rows.append(Row(trunk, method, losses, shares, weights, seconds))
            print(f"  {trunk} + {method}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def sequence_rows(args, scratch, evaluation) -> list[Row]:
    from mergeme.config import SequenceSettings
    from mergeme.models.build import build_ppl_routed

    paths = [args.experts / domain for domain in DOMAINS]
    own = {domain: index for index, domain in enumerate(DOMAINS)}
    variants = {
        "ppl_sequence layer": SequenceSettings(mixing="layer"),
        "ppl_sequence path": SequenceSettings(mixing="path"),
        "ppl_sequence layer, top-1": SequenceSettings(mixing="layer", top_k=1),
        "ppl_sequence layer, T 0.05": SequenceSettings(mixing="layer", temperature=0.05),
        "ppl_sequence layer, prefix 16": SequenceSettings(mixing="layer", prefix_tokens=16),
    }
    rows = []
    for name, settings in variants.items():
        start = time.perf_counter()
        out = scratch / name.replace(" ", "_").replace(",", "")
        build_ppl_routed(paths, out, settings, expert_names=list(DOMAINS))
        losses, shares, weights = measure(out, evaluation, args.max_length, own)
        seconds = time.perf_counter() - start
        rows.append(Row("separate", name, losses, shares, weights, seconds))
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def print_table(rows: list[Row], oracle: dict[str, float], base: dict[str, float]) -> None:
    columns = [f"{d} {c}" for d in DOMAINS for c in ("loss", "own in top-k", "own weight", "gap")]
    print("| trunk | router | " + " | ".join(columns) + " | worst gap | s |")
    print("|" + "---|" * (len(columns) + 4))
    reference = [
        Row("-", "base (dense)", base, {}, {}, 0.0),
        Row("-", "oracle", oracle, {}, {}, 0.0),
    ]
    for row in reference + rows:
        gaps = {d: (row.losses[d] - oracle[d]) / oracle[d] for d in DOMAINS}
        cells = []
        for d in DOMAINS:
            share = f"{row.shares[d]:.2f}" if d in row.shares else "-"
            weight = f"{row.weights[d]:.2f}" if d in row.weights else "-"
            cells.append(f"{row.losses[d]:.3f} | {share} | {weight} | {100 * gaps[d]:+.1f}%")
        worst = max(gaps.values())
        print(f"| {row.trunk} | {row.router} | " + " | ".join(cells), end="")
        print(f" | {100 * worst:+.1f}% | {row.seconds:.0f} |")


def main() -> None:
    args = parse_args()
    scratch = args.out or Path(tempfile.mkdtemp(prefix="mergeme-routing-quality-"))
    from mergeme.workspace import configure_environment

    configure_environment(scratch / "workspace")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for folder in [args.data, *(args.experts / name for name in ("base", *DOMAINS))]:
        if not folder.is_dir():
            raise SystemExit(f"{folder} does not exist; pass --data/--experts or run dvc repro")

    calibration = load_split(args.data, "calibration", args.calibration_texts)
    evaluation = load_split(args.data, "eval", args.eval_texts)
    train = load_split(args.data, "train", 1000)

    begin = time.perf_counter()
    oracle = {}
    for domain in DOMAINS:
        losses, *_ = measure(
            args.experts / domain, {domain: evaluation[domain]}, args.max_length, {}
        )
        oracle[domain] = losses[domain]
    base, *_ = measure(args.experts / "base", evaluation, args.max_length, {})
    rows = token_level_rows(args, scratch, calibration, train, evaluation)
    rows += sequence_rows(args, scratch, evaluation)
    print(
        f"\n{args.eval_texts} eval texts per domain, {args.calibration_texts} calibration texts, "
        f"finetune {args.finetune_steps} steps (batch 8, lr {args.finetune_lr}, routers only, "
        f"from centroid), max length {args.max_length}; gap = (loss - oracle) / oracle; "
        f"total {time.perf_counter() - begin:.0f} s\n"
    )
    print_table(rows, oracle, base)


if __name__ == "__main__":
    main()
