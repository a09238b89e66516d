"""Write a perplexity-routed checkpoint (``mergeme_ppl_moe``) from dense experts.

Tensors are streamed: expert i's tensor ``n`` becomes ``experts.{i}.n``. An expert that ties
its head to its embeddings gets its head written out, so the stored model never relies on
nested weight tying.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from mergeme.checkpoint import Checkpoint
from mergeme.config import SequenceSettings
from mergeme.errors import CheckpointError
from mergeme.io.atomic import atomic_folder
from mergeme.io.safetensors_writer import CODE_DTYPES, CheckpointWriter, TensorSpec
from mergeme.merge.moe_builder import TOKENIZER_FILES

logger = logging.getLogger(__name__)

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PROVENANCE_FILE = "mergeme_ppl_moe.json"


def _check_experts(experts: list[Checkpoint], mixing: str) -> None:
    """Raise CheckpointError for an unsupported or mismatched expert, naming it.

    Every expert must share the vocabulary and tokenizer; ``layer`` mixing sums the experts'
    hidden states layer by layer, so it also needs equal depth and hidden size (``path``
    mixing only sums logits and does not).
    """
    for expert in experts:
        if expert.config.get("model_type") not in DENSE_TYPES:
            raise CheckpointError(
                f"{expert.name}: model_type {expert.config.get('model_type')!r} is not one of "
                f"{DENSE_TYPES}; the perplexity-routed model needs dense decoder stacks"
            )
    reference = experts[0]
    shared = ["vocab_size"] + (["num_hidden_layers", "hidden_size"] if mixing == "layer" else [])
    for expert in experts[1:]:
        for key in shared:
            if expert.config.get(key) != reference.config.get(key):
                fix = "" if key == "vocab_size" else " for mixing 'layer'; or use mixing 'path'"
                raise CheckpointError(
                    f"{expert.name}: {key} {expert.config.get(key)} differs from "
                    f"{reference.name}'s {reference.config.get(key)}; experts must share it{fix}"
                )
        for file in ("tokenizer.json", "tokenizer.model", "vocab.json"):
            ours, theirs = reference.path / file, expert.path / file
            if ours.is_file() and (
                not theirs.is_file() or ours.read_bytes() != theirs.read_bytes()
            ):
                raise CheckpointError(
                    f"{expert.name}: {file} differs from {reference.name}'s; the experts must "
                    "share one tokenizer"
                )


def _plan(experts: list[Checkpoint]) -> tuple[list[TensorSpec], list[dict], dict]:
    """Specs of every output tensor, the experts' configs as stored, and tensor sources."""
    specs, configs, sources = [], [], {}
    for index, expert in enumerate(experts):
        config = dict(expert.config)
        for name in expert.tensor_names():
            target = f"experts.{index}.{name}"
            dtype = CODE_DTYPES[expert.dtype_name(name)]
            specs.append(TensorSpec(target, dtype, expert.shape(name)))
            sources[target] = (expert, name)
        if "lm_head.weight" not in expert and config.get("tie_word_embeddings", False):
            embedding = "model.embed_tokens.weight"
            target = f"experts.{index}.lm_head.weight"
            dtype = CODE_DTYPES[expert.dtype_name(embedding)]
            specs.append(TensorSpec(target, dtype, expert.shape(embedding)))
            sources[target] = (expert, embedding)
            config["tie_word_embeddings"] = False
        config.pop("architectures", None)
        config.pop("transformers_version", None)
        configs.append(config)
    return specs, configs, sources


def build_ppl_routed(
    expert_paths: list[Path],
    out: Path,
    settings: SequenceSettings,
    expert_names: list[str] | None = None,
    overwrite: bool = False,
    max_shard_size: int = 2 * 1024**3,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a ``mergeme_ppl_moe`` checkpoint at ``out`` (atomically) from dense experts,
    with ``extra_files`` (name → text) beside it.

    Raises:
        CheckpointError: an expert is not a supported dense model, or the experts differ in
            vocabulary or tokenizer, or (for ``layer`` mixing) in depth or hidden size.
        ValueError: ``settings.top_k`` is more than the number of experts.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    from mergeme.models.ppl_routed import PplRoutedConfig

    experts = [Checkpoint(path) for path in expert_paths]
    names = expert_names or [expert.name for expert in experts]
    try:
        _check_experts(experts, settings.mixing)
        specs, configs, sources = _plan(experts)
        config = PplRoutedConfig(
            expert_configs=configs,
            expert_names=names,
            experts_per_sequence=settings.top_k,
            mixing=settings.mixing,
            routing_temperature=settings.temperature,
            routing_prefix_tokens=settings.prefix_tokens,
            architectures=["PplRoutedForCausalLM"],
        )
        with atomic_folder(Path(out), overwrite=overwrite) as folder:
            writer = CheckpointWriter(folder, specs, max_shard_size)
            try:
                for spec in specs:
                    expert, name = sources[spec.name]
                    writer.write(spec.name, expert.get(name))
            except BaseException:
                writer.abort()
                raise
            writer.close()
            config.save_pretrained(folder)
            for file in TOKENIZER_FILES:
                if (experts[0].path / file).is_file():
                    shutil.copy2(experts[0].path / file, folder / file)
            provenance = {"experts": names, "sources": [str(p) for p in expert_paths]}
            (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
            for name, text in (extra_files or {}).items():
                (folder / name).write_text(text)
    finally:
        for expert in experts:
            expert.close()
    logger.info("wrote a perplexity-routed model over %d experts to %s", len(experts), out)
    return Path(out)
