"""Routing quality on the demo experts: eval loss per domain, routing share to the matching
expert, and the gap to the oracle (each domain scored by its own dense expert).

For every trunk method × router method (token-level MoE) and for the perplexity-routed
model, prints one table. Every eval text is split into a prefix (its first
``--prefix-tokens`` real tokens) and the rest: the perplexity-routed model chooses its
experts on the prefix only, and every row of the table (the oracle and the base too) is
scored on the tokens after the prefix only, so no router is scored on text it has read to
decide. Run from anywhere:

    python benchmarks/routing_quality.py [--data DIR] [--experts DIR] [--prefix-tokens N]

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
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--calibration-texts", type=int, default=64)
    parser.add_argument("--eval-texts", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--prefix-tokens",
        type=int,
        default=16,
        help="Real tokens of each eval text the sequence router reads; scoring starts after.",
    )
    parser.add_argument(
        "--diagnostics",
        action="store_true",
        help="Also write each row's routing diagnostics (tables, heatmap) under the scratch "
        "folder (one more pass over the eval texts per row).",
    )
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


def scored_mask(attention_mask: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """The real tokens after each row's first ``prefix_tokens`` real tokens: (batch, tokens).
    Used as the mask of :func:`token_losses`, it scores the predictions of those tokens only."""
    seen = attention_mask.long().cumsum(-1)  # real tokens up to and including this one
    return attention_mask * (seen > prefix_tokens).to(attention_mask.dtype)


@dataclass
class Measured:
    losses: dict[str, float]  # nats per scored token
    tokens: dict[str, int]  # scored tokens
    in_top_k: dict[str, float]
    own_weight: dict[str, float]


def measure(
    folder: Path, texts: dict[str, list[str]], args, own: dict[str, int] | None = None
) -> Measured:
    """Per-domain loss on the tokens after the prefix, the share of routing decisions behind
    those tokens whose top-k includes the domain's own expert, and the own expert's mean
    mixing weight (both averaged over layers), from one forward pass per batch; the routing
    numbers are empty without ``own``."""
    from mergeme.evaluate import load_causal_lm
    from mergeme.routing.diagnostics import is_sequence_routed
    from mergeme.text_batches import iter_batches, token_losses

    model, tokenizer = load_causal_lm(folder)
    sequence_routed = is_sequence_routed(model)
    result = Measured({}, {}, {}, {})
    for domain, domain_texts in texts.items():
        total, count, stats = 0.0, 0, torch.zeros(3)
        for batch in iter_batches(tokenizer, domain_texts, args.max_length, batch_size=16):
            extra = {} if not own or sequence_routed else {"output_router_logits": True}
            with torch.no_grad():
                outputs = model(**batch, **extra)
            scored = scored_mask(batch["attention_mask"], args.prefix_tokens)
            nll, tokens = token_losses(outputs.logits, batch["input_ids"], scored)
            total, count = total + nll, count + tokens
            if own:
                stats += _own_expert_stats(model, outputs, scored, own[domain])
        result.losses[domain], result.tokens[domain] = total / max(count, 1), count
        if own:
            result.in_top_k[domain] = float(stats[1] / stats[0].clamp_min(1))
            result.own_weight[domain] = float(stats[2] / stats[0].clamp_min(1))
    return result


def _own_expert_stats(model, outputs, scored: torch.Tensor, own: int) -> torch.Tensor:
    """(routing decisions, decisions whose top-k has ``own``, summed weight of ``own``): (3,).
    A decision is one (token, layer) whose next token is scored, for token routing; one
    sequence with a scored token, for sequence routing."""
    from mergeme.routing.diagnostics import is_sequence_routed

    if is_sequence_routed(model):
        weights = outputs.routing_weights[scored.any(-1), own]  # (scored rows,)
        return torch.tensor([len(weights), float((weights > 0).sum()), float(weights.sum())])
    # the router at token j decides how token j + 1 is predicted
    decides = torch.zeros_like(scored)
    decides[:, :-1] = scored[:, 1:]
    decides = decides.reshape(-1).bool()  # (batch * tokens,)
    top_k = model.config.num_experts_per_tok
    stats = torch.zeros(3)
    for logits in outputs.router_logits:  # one (batch * tokens, experts) per layer
        top = torch.softmax(logits[decides].float(), dim=-1).topk(top_k, dim=-1)
        weights = top.values / top.values.sum(-1, keepdim=True)  # Mixtral's renormalisation
        is_own = top.indices == own  # (tokens, top_k)
        stats += torch.tensor(
            [len(is_own), float(is_own.any(-1).sum()), float((weights * is_own).sum())]
        )
    return stats


def write_diagnostics(args, folder: Path, evaluation, report: dict | None) -> None:
    """Routing diagnostics of one row (as the pipeline's evaluate step writes them)."""
    from mergeme.evaluate import load_causal_lm
    from mergeme.routing.diagnostics import routing_counts, write_routing_diagnostics

    model, tokenizer = load_causal_lm(folder)
    counts = routing_counts(model, tokenizer, evaluation, args.max_length, batch_size=16)
    write_routing_diagnostics(counts, list(DOMAINS), folder / "diagnostics", report)


def _row(args, trunk: str, router: str, folder: Path, evaluation, start: float, report=None):
    """Measure one calibrated checkpoint (and write its diagnostics when asked)."""
    own = {domain: index for index, domain in enumerate(DOMAINS)}
    measured = measure(folder, evaluation, args, own)
    if args.diagnostics:
        write_diagnostics(args, folder, evaluation, report)
    seconds = time.perf_counter() - start
    print(f"  {trunk} + {router}: {seconds:.0f} s", flush=True)
    return Row(trunk, router, measured.losses, measured.in_top_k, measured.own_weight, seconds)


def token_level_rows(args, scratch, calibration, train, evaluation) -> list[Row]:
    from dataclasses import asdict

    from mergeme.checkpoint import Checkpoint
    from mergeme.config import FinetuneSettings, MergeConfig, RouterConfig
    from mergeme.merge.moe_builder import build_moe
    from mergeme.routing.calibrate import calibrate_routers

    paths = [args.experts / domain for domain in DOMAINS]
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
            report = calibrate_routers(
                merged,
                out,
                [calibration[d] for d in DOMAINS],
                settings,
                expert_paths=paths,
                train_texts_per_expert=[train[d] for d in DOMAINS],
            )
            rows.append(_row(args, trunk, method, out, evaluation, start, asdict(report)))
    return rows


def sequence_rows(args, scratch, evaluation) -> list[Row]:
    from mergeme.config import SequenceSettings
    from mergeme.models.build import build_ppl_routed

    paths = [args.experts / domain for domain in DOMAINS]
    prefix = args.prefix_tokens
    variants = {  # every variant chooses its experts on the prefix only
        "ppl_sequence layer": SequenceSettings(mixing="layer"),
        "ppl_sequence path": SequenceSettings(mixing="path"),
        "ppl_sequence layer, top-1": SequenceSettings(mixing="layer", top_k=1),
        "ppl_sequence layer, T 0.05": SequenceSettings(mixing="layer", temperature=0.05),
    }
    rows = []
    for name, settings in variants.items():
        start = time.perf_counter()
        out = scratch / name.replace(" ", "_").replace(",", "")
        settings = settings.model_copy(update={"prefix_tokens": prefix})
        build_ppl_routed(paths, out, settings, expert_names=list(DOMAINS))
        rows.append(_row(args, "separate", name, out, evaluation, start))
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
    if args.prefix_tokens < 2:
        raise SystemExit("--prefix-tokens must be at least 2: the router scores next tokens")

    calibration = load_split(args.data, "calibration", args.calibration_texts)
    evaluation = load_split(args.data, "eval", args.eval_texts)
    train = load_split(args.data, "train", 1000)

    begin = time.perf_counter()
    oracle, scored = {}, {}
    for domain in DOMAINS:
        own = measure(args.experts / domain, {domain: evaluation[domain]}, args)
        oracle[domain], scored[domain] = own.losses[domain], own.tokens[domain]
    base = measure(args.experts / "base", evaluation, args).losses
    rows = token_level_rows(args, scratch, calibration, train, evaluation) if args.routers else []
    rows += sequence_rows(args, scratch, evaluation)
    tokens = ", ".join(f"{d} {n}" for d, n in scored.items())
    print(
        f"\n{args.eval_texts} eval texts per domain, scored after their first "
        f"{args.prefix_tokens} tokens ({tokens} scored tokens); {args.calibration_texts} "
        f"calibration texts; finetune {args.finetune_steps} steps (batch 8, lr "
        f"{args.finetune_lr}, routers only, from centroid); max length {args.max_length}; "
        f"gap = (loss - oracle) / oracle; total {time.perf_counter() - begin:.0f} s\n"
    )
    print_table(rows, oracle, base)
    if args.diagnostics:
        print(f"\nrouting diagnostics: {scratch}/*/diagnostics/")


if __name__ == "__main__":
    main()
