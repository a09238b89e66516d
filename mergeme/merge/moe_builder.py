"""Build an MoE checkpoint from dense experts, one output tensor at a time.

Trunk tensors (embeddings, attention, norms, head) are merged with a trunk method; each
expert's FFN becomes a routed expert in every layer; routers start random (seeded) until
route calibration replaces them. Nothing but the tensors of one output tensor's inputs is
in memory at once.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mergeme.checkpoint import Checkpoint, compare_tensors
from mergeme.config import MergeConfig
from mergeme.errors import CheckpointError
from mergeme.io.atomic import atomic_folder
from mergeme.io.safetensors_writer import CheckpointWriter, TensorSpec
from mergeme.merge.architectures import architecture_for, is_dense_ffn
from mergeme.merge.trunk_methods import TRUNK_METHODS, merge_trunk_tensor

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class _Job:
    spec: TensorSpec
    compute: Callable[[], torch.Tensor]


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


def trunk_parameters(settings: MergeConfig) -> dict:
    """The parameters the chosen trunk method actually uses (logged as MLflow params)."""
    method = TRUNK_METHODS[settings.trunk_method]
    values = {
        "density": settings.density,
        "scale": settings.scale,
        "ties_agreement": settings.ties_agreement,
        "seed": settings.seed,
    }
    used = {key: values[key] for key in method.defaults if key in values}
    if settings.expert_weights is not None:
        used["expert_weights"] = list(settings.expert_weights)
    return used


def _plan(
    base: Checkpoint, experts: list[Checkpoint], settings: MergeConfig, out_dtype: torch.dtype
) -> list[_Job]:
    architecture = architecture_for(base.config)
    method = TRUNK_METHODS[settings.trunk_method]
    params = trunk_parameters(settings)
    params.pop("expert_weights", None)
    jobs: list[_Job] = []

    # trunk: every dense tensor that is not an FFN weight
    for name in base.tensor_names():
        if is_dense_ffn(name):
            continue

        def merge_one(name: str = name) -> torch.Tensor:
            return merge_trunk_tensor(
                settings.trunk_method,
                base.get(name) if method.needs_base else None,
                [expert.get(name) for expert in experts],
                weights=settings.expert_weights,
                tensor_name=name,
                out_dtype=out_dtype,
                **params,
            )

        jobs.append(_Job(TensorSpec(name, out_dtype, base.shape(name)), merge_one))

    # routed experts: expert i's FFN becomes expert slot i of every layer
    for index, expert in enumerate(experts):
        for name in filter(is_dense_ffn, expert.tensor_names()):
            target = architecture.expert_tensor_name(name, index)
            jobs.append(
                _Job(
                    TensorSpec(target, out_dtype, expert.shape(name)),
                    lambda expert=expert, name=name: expert.get(name).to(out_dtype),
                )
            )

    # routers last, so that calibration rewrites only the final shard
    hidden = base.config["hidden_size"]
    std = float(base.config.get("initializer_range", 0.02))
    for layer in range(base.config["num_hidden_layers"]):
        generator = torch.Generator().manual_seed(settings.seed * 100_003 + layer)

        def random_router(generator: torch.Generator = generator) -> torch.Tensor:
            # (num_experts, hidden)
            weight = torch.randn(len(experts), hidden, generator=generator) * std
            return weight.to(out_dtype)

        name = architecture.router_name(layer)
        jobs.append(_Job(TensorSpec(name, out_dtype, (len(experts), hidden)), random_router))
    return jobs


def build_moe(
    base: Checkpoint,
    experts: list[Checkpoint],
    out: Path,
    settings: MergeConfig,
    overwrite: bool = False,
) -> MergeReport:
    """Merge dense ``experts`` (fine-tunes of ``base``) into an MoE checkpoint at ``out``.

    Returns:
        A MergeReport describing what was written.

    Raises:
        UnsupportedArchitectureError: no MoE family serves the base's architecture.
        CheckpointError: an expert's tensors differ from the base's.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    architecture = architecture_for(base.config)
    check_same_tensors(base, experts)
    if len(experts) & (len(experts) - 1):
        logger.warning(
            "%d experts is not a power of two; llama.cpp and some servers expect 2, 4 or 8",
            len(experts),
        )
    out_dtype = getattr(torch, settings.output_dtype)
    jobs = _plan(base, experts, settings, out_dtype)

    with atomic_folder(Path(out), overwrite=overwrite) as folder:
        writer = CheckpointWriter(folder, [job.spec for job in jobs], settings.max_shard_size)
        try:
            for job in tqdm(jobs, desc=f"merging {len(experts)} experts", unit="tensor"):
                writer.write(job.spec.name, job.compute())
        except BaseException:
            writer.abort()
            raise
        writer.close()

        config = architecture.moe_config(base.config, len(experts), settings.experts_per_token)
        config["dtype"] = settings.output_dtype
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
        (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    logger.info("wrote %s MoE with %d experts to %s", architecture.name, len(experts), out)
    return report
