"""The merge plan: every output tensor of the MoE, known from metadata before any data is read.

Each ``TensorJob`` names its output (dtype, shape), the group it belongs to (for progress
bars), and how to produce it: a function computing the tensor, or, when the output is a
byte-for-byte copy of one input tensor, that tensor's location so the bytes can be copied
straight from file to file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergeme.checkpoint import Checkpoint, TensorLocation
from mergeme.config import MergeConfig
from mergeme.io.safetensors_writer import TensorSpec
from mergeme.merge.families import MoEArchitecture, is_dense_ffn
from mergeme.merge.flat import CheckpointSource
from mergeme.merge.trunk_methods import TRUNK_METHODS, merge_trunk_sources

GROUPS = ("trunk", "experts", "routers")


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: what it is, its group, and how to produce it.

    ``compute`` returns the tensor in ``spec.dtype``; ``copy_from``, when set, says the output
    is exactly the bytes of that input tensor (same dtype and shape), which is cheaper.
    """

    spec: TensorSpec
    group: str
    compute: Callable[[], torch.Tensor]
    copy_from: TensorLocation | None = None


def trunk_parameters(settings: MergeConfig) -> dict:
    """The parameters the chosen trunk method actually uses (logged as MLflow params)."""
    method = TRUNK_METHODS[settings.trunk_method]
    values = {
        "density": settings.density,
        "scale": settings.scale,
        "ties_agreement": settings.ties_agreement,
        "seed": settings.seed,
    }
    used = {key: values[key] for key in method.defaults}
    if settings.expert_weights is not None:
        used["expert_weights"] = list(settings.expert_weights)
    return used


def _copy_job(
    source: Checkpoint, name: str, target: str, group: str, out_dtype: torch.dtype
) -> TensorJob:
    spec = TensorSpec(target, out_dtype, source.shape(name))
    location = source.location(name)
    same_bytes = location is not None and location.dtype == out_dtype
    return TensorJob(
        spec,
        group,
        lambda: source.get(name).to(out_dtype),
        copy_from=location if same_bytes else None,
    )


def _trunk_jobs(
    base: Checkpoint, experts: list[Checkpoint], settings: MergeConfig, out_dtype: torch.dtype
) -> list[TensorJob]:
    method = TRUNK_METHODS[settings.trunk_method]
    params = {k: v for k, v in trunk_parameters(settings).items() if k != "expert_weights"}
    jobs = []
    for name in base.tensor_names():
        if is_dense_ffn(name):
            continue
        if settings.trunk_method == "base":
            jobs.append(_copy_job(base, name, name, "trunk", out_dtype))
            continue

        def merge_one(name: str = name) -> torch.Tensor:
            # the copies are read range by range while merging, never whole
            return merge_trunk_sources(
                settings.trunk_method,
                CheckpointSource(base, name) if method.needs_base else None,
                [CheckpointSource(expert, name) for expert in experts],
                weights=settings.expert_weights,
                tensor_name=name,
                out_dtype=out_dtype,
                **params,
            )

        jobs.append(TensorJob(TensorSpec(name, out_dtype, base.shape(name)), "trunk", merge_one))
    return jobs


def _router_jobs(
    dense_config: dict, num_experts: int, architecture: MoEArchitecture, settings: MergeConfig
) -> list[TensorJob]:
    out_dtype = getattr(torch, settings.output_dtype)
    hidden = dense_config["hidden_size"]
    std = float(dense_config["initializer_range"])
    jobs = []
    for layer in range(dense_config["num_hidden_layers"]):

        def random_router(layer: int = layer) -> torch.Tensor:
            generator = torch.Generator().manual_seed(settings.seed * 100_003 + layer)
            # (num_experts, hidden)
            weight = torch.randn(num_experts, hidden, generator=generator) * std
            return weight.to(out_dtype)

        spec = TensorSpec(architecture.router_name(layer), out_dtype, (num_experts, hidden))
        jobs.append(TensorJob(spec, "routers", random_router))
    return jobs


def plan_merge(
    base: Checkpoint,
    experts: list[Checkpoint],
    architecture: MoEArchitecture,
    settings: MergeConfig,
    dense_config: dict,
) -> list[TensorJob]:
    """Every output tensor of the MoE in write order: trunk, experts (with the family's extra
    tensors), then routers last so that calibration rewrites only the final shard.
    ``dense_config`` is the base's normalised config (``normalise_dense_config``)."""
    out_dtype = getattr(torch, settings.output_dtype)
    jobs = _trunk_jobs(base, experts, settings, out_dtype)

    # routed experts: expert i's FFN becomes expert slot i of every layer
    for index, expert in enumerate(experts):
        for name in filter(is_dense_ffn, expert.tensor_names()):
            target = architecture.expert_tensor_name(name, index)
            jobs.append(_copy_job(expert, name, target, "experts", out_dtype))

    # family extras (a shared expert): copies of base tensors, or zeros
    for extra in architecture.extra_tensors(dense_config, settings):
        if extra.copy_from is not None:
            jobs.append(_copy_job(base, extra.copy_from, extra.name, "experts", out_dtype))
        else:
            spec = TensorSpec(extra.name, out_dtype, extra.shape)
            jobs.append(
                TensorJob(spec, "experts", lambda s=spec: torch.zeros(s.shape, dtype=s.dtype))
            )

    return jobs + _router_jobs(dense_config, len(experts), architecture, settings)
