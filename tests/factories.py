"""Tiny real checkpoints for tests: a random Llama base and experts that differ from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergeme.demo.data import DemoDataParams, build_demo_data
from mergeme.demo.experts import train_tokenizer

DOMAINS = ("math", "code", "knowledge")


def tiny_llama_config(vocab_size: int = 128, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def random_llama(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1; make them distinct so tests see them
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def perturbed(model: LlamaForCausalLM, seed: int, scale: float = 0.02) -> LlamaForCausalLM:
    """A copy of ``model`` with seeded noise on every weight: a stand-in fine-tune."""
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in copy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return copy


@dataclass(frozen=True)
class TinyFamily:
    root: Path
    base: Path
    experts: dict[str, Path]  # domain -> checkpoint folder
    data: Path


def build_tiny_family(root: Path) -> TinyFamily:
    data = root / "data"
    build_demo_data(
        DemoDataParams(seed=3, train_size=40, calibration_size=8, eval_size=8, max_chars=200),
        data,
    )
    texts = [
        line
        for domain in DOMAINS
        for line in (data / domain / "train.jsonl").read_text().split("\n")
    ]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base = random_llama(config, seed=0)
    folders = {}
    family = [("base", base)] + [(d, perturbed(base, seed=10 + i)) for i, d in enumerate(DOMAINS)]
    for name, model in family:
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return TinyFamily(root, folders.pop("base"), folders, data)
