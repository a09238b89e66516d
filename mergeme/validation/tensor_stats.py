"""Per-tensor statistics of one expert checkpoint, one row per tensor.

The table is what the Great Expectations suite in ``gx_suite`` validates before a merge. Every
statistic is computed in float32, reading one tensor at a time, so a table never needs more
memory than the largest tensor (times two for a BF16 or F16 source, which is cast up).
"""

from __future__ import annotations

import logging
import math

import pandas as pd
import torch
from tqdm import tqdm

from mergeme.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

TENSOR_STATS_COLUMNS = [
    "expert",
    "tensor",
    "shape",
    "dtype",
    "numel",
    "mean",
    "std",
    "max_abs",
    "finite_fraction",
    "norm",
]


def shape_label(shape: tuple[int, ...]) -> str:
    """``(32, 64)`` -> ``"32x64"``; a 0-d tensor is ``"scalar"``."""
    return "x".join(str(size) for size in shape) if shape else "scalar"


def _finite_stats(values: torch.Tensor) -> dict[str, float]:
    """mean, population std, max |x| and L2 norm of a flat float32 tensor of finite values.

    An empty tensor (no finite value at all) gives NaN for each: there is nothing to measure,
    and its finite_fraction below 1 (or numel 0) already flags the row.
    """
    if values.numel() == 0:
        return {"mean": math.nan, "std": math.nan, "max_abs": math.nan, "norm": math.nan}

    # population std (correction=0): a single value has std 0, not NaN as with correction=1
    std, mean = torch.std_mean(values, correction=0)
    return {
        "mean": mean.item(),
        "std": std.item(),
        "max_abs": values.abs().max().item(),
        "norm": torch.linalg.vector_norm(values).item(),
    }


def _tensor_row(checkpoint: Checkpoint, expert: str, name: str) -> dict[str, object]:
    # [numel] float32; a no-op view when the stored tensor is already float32
    values = checkpoint.get(name).to(torch.float32).reshape(-1)
    numel = values.numel()

    # non-finite entries would turn every statistic into NaN or Inf: drop them and report
    # how many were kept instead, so the suite can name the tensor
    finite = torch.isfinite(values)
    finite_count = int(finite.sum().item())
    if finite_count < numel:
        values = values[finite]
    finite_fraction = finite_count / numel if numel else 1.0

    row: dict[str, object] = {
        "expert": expert,
        "tensor": name,
        "shape": shape_label(checkpoint.shape(name)),
        "dtype": checkpoint.dtype_name(name),
        "numel": numel,
        **_finite_stats(values),
        "finite_fraction": finite_fraction,
    }
    logger.debug("%s: %s %s", expert, name, row)
    return row


def tensor_stats_table(checkpoint: Checkpoint, expert: str) -> pd.DataFrame:
    """Statistics of every tensor in ``checkpoint``, sorted by tensor name.

    Returns:
        One row per tensor with the columns of ``TENSOR_STATS_COLUMNS``: ``expert`` (the name
        given), ``tensor``, ``shape`` (``"32x64"``), ``dtype`` (the safetensors code, ``"BF16"``),
        ``numel``, then ``mean``, ``std`` (population), ``max_abs`` and ``norm`` (L2), all over
        the finite values only, and ``finite_fraction`` (finite values / numel; 1.0 for an empty
        tensor).

    Raises:
        CheckpointError: a weight file cannot be read.
    """
    names = checkpoint.tensor_names()
    rows = [
        _tensor_row(checkpoint, expert, name)
        for name in tqdm(names, desc=f"tensor statistics of {expert}", unit="tensor", disable=None)
    ]
    table = pd.DataFrame(rows, columns=TENSOR_STATS_COLUMNS)

    non_finite = int((table["finite_fraction"] < 1.0).sum())
    logger.info(
        "computed statistics of %d tensors of expert %r (%d with non-finite values)",
        len(table),
        expert,
        non_finite,
    )
    return table
