"""Build an MoE checkpoint from dense experts, one output tensor at a time.

Trunk tensors (embeddings, attention, norms, head) are merged with a trunk method; each
expert's FFN becomes a routed expert in every layer; routers start random (seeded) until
route calibration replaces them. ``plan.py`` lists the output tensors from metadata,
``streaming.py`` produces and writes them; nothing but the inputs of a few output tensors is
in memory at once.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergeme.checkpoint import SAFETENSORS_DTYPES, Checkpoint, compare_tensors
from mergeme.config import MergeConfig
from mergeme.errors import CheckpointError, ConfigError
from mergeme.io.atomic import atomic_folder
from mergeme.io.safetensors_writer import CheckpointWriter
from mergeme.merge.families import architecture_for, normalise_dense_config
from mergeme.merge.plan import plan_merge, trunk_parameters
from mergeme.merge.streaming import run_jobs

logger = logging.getLogger(__name__)

__all__ = [
    "MergeReport",
    "build_moe",
    "check_expert_weights",
    "check_same_tensors",
    "trunk_parameters",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
PROVENANCE_FILE = "mergeme_merge.json"


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote: the folder, the family, and the settings that produced it."""

    output: str
    architecture: str
    num_experts: int
    experts_per_token: int
    trunk_method: str
    trunk_parameters: dict
    tensors_written: int
    total_bytes: int


def check_same_tensors(base: Checkpoint, experts: list[Checkpoint]) -> None:
    """Raise CheckpointError listing every expert tensor that is missing, extra, or shaped
    differently from the base."""
    problems = [problem for expert in experts for problem in compare_tensors(base, expert)]
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(
            f"experts differ from the base: {shown}{more}; every expert must be a fine-tune "
            "of the same base architecture"
        )


def check_expert_weights(settings: MergeConfig, num_experts: int) -> None:
    """Raise ConfigError unless ``merge.expert_weights`` is unset or has one weight per expert."""
    weights = settings.expert_weights
    if weights is not None and len(weights) != num_experts:
        raise ConfigError(
            f"merge.expert_weights has {len(weights)} weights for {num_experts} experts; give "
            "one weight per expert, in the order of `experts`, or leave it out for equal weights"
        )


# the dtype names output_dtype may take, by torch dtype
OUTPUT_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolved_output_dtype(settings: MergeConfig, base: Checkpoint) -> str:
    """``merge.output_dtype``, with ``auto`` replaced by the dtype the base stores its
    embedding in (float32 if that is not a float32, bfloat16 or float16)."""
    if settings.output_dtype != "auto":
        return settings.output_dtype
    embedding = next((n for n in base.tensor_names() if n.endswith("embed_tokens.weight")), None)
    stored = SAFETENSORS_DTYPES[base.dtype_name(embedding)] if embedding else torch.float32
    return OUTPUT_DTYPES.get(stored, "float32")


def build_moe(
    base: Checkpoint,
    experts: list[Checkpoint],
    out: Path,
    settings: MergeConfig,
    overwrite: bool = False,
) -> MergeReport:
    """Merge dense ``experts`` (fine-tunes of ``base``) into an MoE checkpoint at ``out``.

    Every check runs before ``out`` (or its temporary sibling) is created.

    Returns:
        A MergeReport describing what was written.

    Raises:
        UnsupportedArchitectureError: no MoE family serves the base's architecture.
        CheckpointError: an expert's tensors differ from the base's.
        ConfigError: ``merge.expert_weights`` does not have one weight per expert.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    dense_config = normalise_dense_config(base.config)
    architecture = architecture_for(dense_config)
    settings = settings.model_copy(update={"output_dtype": resolved_output_dtype(settings, base)})
    check_same_tensors(base, experts)
    check_expert_weights(settings, len(experts))
    if len(experts) & (len(experts) - 1):
        logger.warning(
            "%d experts is not a power of two; llama.cpp and some servers expect 2, 4 or 8",
            len(experts),
        )
    jobs = plan_merge(base, experts, architecture, settings, dense_config)
    config = architecture.moe_config(dense_config, len(experts), settings)
    config["dtype"] = settings.output_dtype

    with atomic_folder(Path(out), overwrite=overwrite) as folder:
        writer = CheckpointWriter(folder, [job.spec for job in jobs], settings.max_shard_size)
        try:
            run_jobs(jobs, writer)
        except BaseException:
            writer.abort()
            raise
        writer.close()

        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for file in TOKENIZER_FILES:
            if (base.path / file).is_file():
                shutil.copy2(base.path / file, folder / file)
        report = MergeReport(
            output=str(Path(out).resolve()),
            architecture=architecture.name,
            num_experts=len(experts),
            experts_per_token=settings.experts_per_token,
            trunk_method=settings.trunk_method,
            trunk_parameters=trunk_parameters(settings),
            tensors_written=len(jobs),
            total_bytes=writer.total_size,
        )
        provenance = {**asdict(report), "experts": [e.name for e in experts], "base": base.name}
        if architecture.name == "qwen2_moe":
            provenance["shared_expert"] = settings.shared_expert
        (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    logger.info("wrote %s MoE with %d experts to %s", architecture.name, len(experts), out)
    return report
