"""Building perplexity-routed models from the tiny family, for the model tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mergeme.models  # noqa: F401  (registers the Auto classes)
from mergeme.config import SequenceSettings
from mergeme.models.build import build_ppl_routed

TEXT = "Ann has 3 apples and buys 4 more. Answer:"
TEXTS = [TEXT, "def add(x, y):\n    return x + y", "The capital of Peru is"]


def dense(path):
    """A dense expert as transformers loads it, in float32."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def build(paths, folder, names=None, **settings):
    """Write a perplexity-routed checkpoint over ``paths`` into ``folder`` and load it."""
    build_ppl_routed(list(paths), folder, SequenceSettings(**settings), expert_names=names)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def build_family(tiny_family, tmp_path, domains, **settings):
    """The model over the tiny family's experts of ``domains``."""
    folder = tmp_path / f"ppl-{'-'.join(domains)}-{settings.get('mixing', 'layer')}"
    paths = [tiny_family.experts[d] for d in domains]
    model, tokenizer = build(paths, folder, list(domains), **settings)
    return folder, model, tokenizer


def expert_losses(experts, ids) -> torch.Tensor:
    """Each dense expert's own mean loss on one unpadded row ``ids`` (1, tokens): (experts,)."""
    with torch.no_grad():
        return torch.tensor([e(input_ids=ids, labels=ids).loss.item() for e in experts])
