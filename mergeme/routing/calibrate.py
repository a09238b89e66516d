"""Route calibration: write an MoE checkpoint whose routers were set by a router method.

``random``, ``centroid``, ``ppl_probe`` and ``finetune`` rewrite only the shards holding the
tensors they changed (routers, and with ``finetune`` beyond routers also trunk or experts);
``ppl_sequence`` writes a perplexity-routed model of its own (``mergeme.models``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mergeme.checkpoint import Checkpoint
from mergeme.config import RouterConfig
from mergeme.io.atomic import atomic_folder
from mergeme.io.derive import derive_checkpoint
from mergeme.merge.families import architecture_for_moe
from mergeme.routing.centroid import centroid_routers, load_negative_texts
from mergeme.routing.diagnostics import condition_number, warn_on_ill_conditioned
from mergeme.routing.finetune import finetune_moe
from mergeme.routing.methods import router_method
from mergeme.routing.ppl_probe import perplexity_labels, ppl_probe_routers

logger = logging.getLogger(__name__)

ROUTER_FILE = "mergeme_router.json"


@dataclass(frozen=True)
class CalibrationReport:
    output: str
    method: str
    texts_per_expert: list[int]
    max_cosine_between_rows: list[float]
    condition_numbers: list[float] = field(default_factory=list)
    probe_label_counts: list[int] = field(default_factory=list)
    loss_curves: dict[str, list[float]] = field(default_factory=dict)


def max_row_cosines(routers: list[torch.Tensor]) -> list[float]:
    """Per layer, the largest cosine similarity between two different router rows."""
    cosines = []
    for weight in routers:
        norms = weight.norm(dim=-1, keepdim=True)
        cosine = weight @ weight.T / (norms * norms.T + 1e-8)  # (experts, experts)
        eye = torch.eye(len(weight), device=weight.device)
        cosines.append(float((cosine - eye).max()))
    return cosines


def _random_routers(source: Checkpoint, names: list[str], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = source.shape(names[0])
    std = float(source.config.get("initializer_range", 0.02))
    routers = [torch.randn(shape, generator=generator) * std for _ in names]
    return routers


def _set_routers(model, routers: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, weight in zip(model.model.layers, routers):
            layer.mlp.gate.weight.copy_(weight)


def _initial_routers(
    method: str, model, tokenizer, source, names, texts_per_expert, settings, expert_paths
) -> tuple[list[torch.Tensor], list[int]]:
    """Routers of ``method`` (set into ``model`` too) and the probe's label counts."""
    if method == "random":
        routers = _random_routers(source, names, settings.seed)
        _set_routers(model, routers)
        return routers, []
    if method == "centroid":
        centroid = settings.centroid
        negative_texts = None
        if centroid.negative == "texts":
            negative_texts = load_negative_texts(centroid.negative_texts)
        routers = centroid_routers(
            model,
            tokenizer,
            texts_per_expert,
            settings.max_length,
            negative=centroid.negative,
            negative_weight=centroid.negative_weight,
            negative_texts=negative_texts,
        )
        return routers, []
    if not expert_paths:
        raise ValueError(
            "router method ppl_probe needs the dense experts' folders (expert_paths), in "
            "the order of the MoE's experts"
        )
    texts = [text for texts in texts_per_expert for text in texts]
    labels, _ = perplexity_labels(expert_paths, texts, settings.max_length)
    counts = torch.bincount(labels, minlength=len(expert_paths)).tolist()
    routers = ppl_probe_routers(
        model, tokenizer, texts, labels, settings.probe, settings.max_length, seed=settings.seed
    )
    return routers, counts


def calibrate_routers(
    merged: Path,
    out: Path,
    texts_per_expert: list[list[str]],
    settings: RouterConfig,
    overwrite: bool = False,
    expert_paths: list[Path] | None = None,
    train_texts_per_expert: list[list[str]] | None = None,
    expert_names: list[str] | None = None,
) -> CalibrationReport:
    """Write ``out``: the MoE at ``merged`` with routers set by ``settings.method``.

    ``texts_per_expert[i]`` are the calibration texts of expert i's domain;
    ``expert_paths`` the dense experts (needed by ``ppl_probe`` and ``ppl_sequence``);
    ``train_texts_per_expert`` the texts ``finetune`` trains on (default: the calibration ones);
    ``expert_names`` name the experts inside a ``ppl_sequence`` model (default: folder names).

    Raises:
        ValueError: a method needs ``expert_paths`` and none were given.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    method = router_method(settings.method)
    if method.output == "model":
        from mergeme.models.build import build_ppl_routed

        if not expert_paths:
            raise ValueError("router method ppl_sequence needs the dense experts' folders")
        report = CalibrationReport(
            str(Path(out).resolve()), method.name, [len(t) for t in texts_per_expert], []
        )
        extra = {ROUTER_FILE: json.dumps(asdict(report), indent=2)}
        build_ppl_routed(
            expert_paths,
            out,
            settings.sequence,
            expert_names=expert_names,
            overwrite=overwrite,
            extra_files=extra,
        )
        return report
    with Checkpoint(merged) as source:
        return _calibrate_moe(
            source, out, texts_per_expert, settings, overwrite, expert_paths, train_texts_per_expert
        )


def _calibrate_moe(
    source, out, texts_per_expert, settings, overwrite, expert_paths, train_texts
) -> CalibrationReport:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = architecture_for_moe(source.config)
    layers = source.config["num_hidden_layers"]
    names = [architecture.router_name(layer) for layer in range(layers)]
    dtype = source.get(names[0]).dtype
    start = settings.finetune.init if settings.method == "finetune" else settings.method

    # the model is only needed when hidden states or gradients are involved
    model = tokenizer = None
    if settings.method != "random":
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch.float32, trust_remote_code=False
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    if model is None:
        routers, counts = _random_routers(source, names, settings.seed), []
    else:
        routers, counts = _initial_routers(
            start, model, tokenizer, source, names, texts_per_expert, settings, expert_paths
        )

    curves: dict[str, list[float]] = {}
    if settings.method == "finetune":
        curves = finetune_moe(
            model,
            tokenizer,
            train_texts or texts_per_expert,
            settings.finetune,
            settings.max_length,
            settings.seed,
        )
        routers = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]

    conditions = [condition_number(weight) for weight in routers]
    warn_on_ill_conditioned(conditions, settings.centroid.max_condition_number, settings.method)
    report = CalibrationReport(
        output=str(Path(out).resolve()),
        method=settings.method,
        texts_per_expert=[len(texts) for texts in texts_per_expert],
        max_cosine_between_rows=max_row_cosines(routers),
        condition_numbers=conditions,
        probe_label_counts=counts,
        loss_curves=curves,
    )
    extra = {ROUTER_FILE: json.dumps(asdict(report), indent=2)}
    if settings.method == "finetune" and settings.finetune.scope == "all":
        _save_whole_model(model, source, Path(out), extra, overwrite)
    else:
        replacements = {name: weight.to(dtype) for name, weight in zip(names, routers)}
        if settings.method == "finetune" and settings.finetune.scope == "routers_and_trunk":
            replacements |= _trunk_tensors(model, source, dtype)
        derive_checkpoint(source, Path(out), replacements, extra_files=extra, overwrite=overwrite)
    logger.info("calibrated %d routers with %s into %s", len(names), settings.method, out)
    return report


def _trunk_tensors(model, source: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trained trunk tensors, under their checkpoint names (the same as in memory)."""
    trunk = {}
    for name, param in model.named_parameters():
        if name.endswith(".mlp.gate.weight") or ".mlp.experts." in name:
            continue  # routers are written under the architecture's names; experts untouched
        if name not in source:
            raise ValueError(f"trunk tensor {name!r} of the model is not in {source.path}")
        trunk[name] = param.detach().to(dtype)
    return trunk


def _save_whole_model(model, source: Checkpoint, out: Path, extra: dict, overwrite: bool):
    """Everything was trained: let transformers write the checkpoint (classic layout)."""
    with atomic_folder(out, overwrite=overwrite) as folder:
        model.to(source.get(source.tensor_names()[0]).dtype).save_pretrained(folder)
        for item in source.path.iterdir():
            if item.is_file() and not (folder / item.name).exists() and _is_side_file(item):
                (folder / item.name).write_bytes(item.read_bytes())
        for file_name, text in extra.items():
            (folder / file_name).write_text(text)


def _is_side_file(item: Path) -> bool:
    """Tokenizer and provenance files that save_pretrained does not write."""
    return not item.name.endswith((".safetensors", ".bin")) and item.name != (
        "model.safetensors.index.json"
    )
