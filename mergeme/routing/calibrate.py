"""Route calibration: write calibrated routers into a merged MoE checkpoint."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergeme.checkpoint import Checkpoint
from mergeme.config import RouterConfig
from mergeme.io.derive import derive_checkpoint
from mergeme.merge.architectures import architecture_for_moe
from mergeme.routing.centroid import centroid_routers

logger = logging.getLogger(__name__)

ROUTER_FILE = "mergeme_router.json"


@dataclass(frozen=True)
class CalibrationReport:
    output: str
    method: str
    texts_per_expert: list[int]
    max_cosine_between_rows: list[float]


def calibrate_routers(
    merged: Path,
    out: Path,
    texts_per_expert: list[list[str]],
    settings: RouterConfig,
    overwrite: bool = False,
) -> CalibrationReport:
    """Write ``out``: the MoE at ``merged`` with routers set by ``settings.method``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with Checkpoint(merged) as source:
        architecture = architecture_for_moe(source.config)
        layers = source.config["num_hidden_layers"]
        names = [architecture.router_name(layer) for layer in range(layers)]
        dtype = source.get(names[0]).dtype

        if settings.method == "random":
            generator = torch.Generator().manual_seed(settings.seed)
            shape = source.shape(names[0])
            std = float(source.config.get("initializer_range", 0.02))
            routers = [torch.randn(shape, generator=generator) * std for _ in names]
        else:
            model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(merged)
            routers = centroid_routers(model, tokenizer, texts_per_expert, settings.max_length)
            del model

        cosines = []
        for weight in routers:
            cosine = (
                weight @ weight.T / (weight.norm(dim=-1, keepdim=True) * weight.norm(dim=-1) + 1e-8)
            )
            cosines.append(float((cosine - torch.eye(len(weight))).max()))
        report = CalibrationReport(
            output=str(Path(out).resolve()),
            method=settings.method,
            texts_per_expert=[len(texts) for texts in texts_per_expert],
            max_cosine_between_rows=cosines,
        )
        replacements = {name: weight.to(dtype) for name, weight in zip(names, routers)}
        derive_checkpoint(
            source,
            Path(out),
            replacements,
            extra_files={ROUTER_FILE: json.dumps(asdict(report), indent=2)},
            overwrite=overwrite,
        )
    logger.info("calibrated %d routers with %s into %s", len(names), settings.method, out)
    return report
