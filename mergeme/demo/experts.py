"""Train the demo's tiny experts: a tokenizer, a Llama base on the domain mixture, and one
expert per domain continued from the base on that domain alone.

The stage checks that every expert really is one: on its own domain's eval split its loss
must be lower, by at least ``min_specialisation``, than the base's and every other expert's.
Run it as ``python -m mergeme.demo.experts --params params.yaml --data data/demo --out
data/experts``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from mergeme.demo.data import DOMAINS
from mergeme.evaluate import score_domains
from mergeme.io.atomic import atomic_folder

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
REPORT = "report.json"


class DemoExpertParams(BaseModel):
    """The ``experts:`` section of the demo's params file."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 7
    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(384, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    seq_len: int = Field(128, ge=16)
    batch_size: int = Field(16, ge=1)
    base_steps: int = Field(400, ge=1)
    base_lr: float = Field(3e-3, gt=0)
    expert_steps: int = Field(200, ge=1)
    expert_lr: float = Field(1e-3, gt=0)
    eval_texts: int = Field(64, ge=1)
    min_specialisation: float = Field(0.10, ge=0, lt=1)


def read_split(data: Path, domain: str, split: str) -> list[str]:
    path = data / domain / f"{split}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer that prepends ``<s>`` to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def token_blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """All texts, each followed by ``</s>``, concatenated and cut into (blocks, seq_len)."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable]).view(-1, seq_len)


def train(model, blocks: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """AdamW with linear warm-up and cosine decay over random batches; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + torch.cos(torch.tensor(step / steps * torch.pi)).item())
        ),
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        rows = torch.randint(len(blocks), (batch_size,), generator=generator)
        batch = blocks[rows]  # (batch, seq_len)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            logger.info("step %d/%d: loss %.3f", step, steps, loss.item())
    model.eval()
    return float(loss.item())


def new_base_model(params: DemoExpertParams, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_kv_heads,
        max_position_embeddings=max(256, params.seq_len),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(params.seed)
    return LlamaForCausalLM(config)


def specialisation_problems(losses: dict[str, dict[str, float]], min_gain: float) -> list[str]:
    """Each expert must beat the base and every other expert on its own domain by
    ``min_gain`` (relative): ``losses[model][domain]``."""
    problems = []
    for domain in DOMAINS:
        own = losses[domain][domain]
        for other, scores in losses.items():
            if other != domain and own > (1 - min_gain) * scores[domain]:
                problems.append(
                    f"expert {domain!r} loss {own:.3f} on {domain} is not {min_gain:.0%} below "
                    f"{other!r} ({scores[domain]:.3f})"
                )
    return problems


def build_demo_experts(params: DemoExpertParams, data: Path, out: Path) -> dict:
    """Train and save base and experts under ``out``; returns the report (eval losses).

    Raises:
        RuntimeError: an expert is not specialised enough (see ``min_specialisation``).
    """
    random.seed(params.seed)
    torch.manual_seed(params.seed)
    train_texts = {domain: read_split(data, domain, "train") for domain in DOMAINS}
    eval_texts = {d: read_split(data, d, "eval")[: params.eval_texts] for d in DOMAINS}
    tokenizer = train_tokenizer([t for d in DOMAINS for t in train_texts[d]], params.vocab_size)
    blocks = {d: token_blocks(tokenizer, train_texts[d], params.seq_len) for d in DOMAINS}

    # base: the domain mixture, equal shares
    smallest = min(len(b) for b in blocks.values())
    mixture = torch.cat([b[:smallest] for b in blocks.values()])
    base = new_base_model(params, tokenizer)
    logger.info("training base (%d parameters)", sum(p.numel() for p in base.parameters()))
    train(base, mixture, params.base_steps, params.base_lr, params.batch_size, params.seed)
    models = {"base": base}
    for index, domain in enumerate(DOMAINS):
        logger.info("training expert %s", domain)
        expert = copy.deepcopy(base)
        seed = params.seed + 1 + index
        train(
            expert, blocks[domain], params.expert_steps, params.expert_lr, params.batch_size, seed
        )
        models[domain] = expert

    losses = {}
    for name, model in models.items():
        scores = score_domains(model, tokenizer, name, eval_texts, params.seq_len, 16)
        losses[name] = {score.domain: round(score.loss, 4) for score in scores}
    problems = specialisation_problems(losses, params.min_specialisation)
    if problems:
        raise RuntimeError("demo experts are not specialised: " + "; ".join(problems))

    report = {
        "parameters": sum(p.numel() for p in base.parameters()),
        "eval_loss": losses,
        "params": params.model_dump(),
    }
    with atomic_folder(out, overwrite=True) as folder:
        for name, model in models.items():
            model.save_pretrained(folder / name)
            tokenizer.save_pretrained(folder / name)
        (folder / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("data/experts"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    section = (yaml.safe_load(args.params.read_text()) or {}).get("experts", {})
    params = DemoExpertParams.model_validate(section)
    torch.set_num_threads(2)
    report = build_demo_experts(params, args.data, args.out)
    print(json.dumps(report["eval_loss"], indent=2))


if __name__ == "__main__":
    main()
