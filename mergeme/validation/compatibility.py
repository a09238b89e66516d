"""Can these experts be merged with this base? Same family and shapes, same vocabulary and
tokenizer, each a fine-tune of the base, no two identical.

"Not a fine-tune" is measured by the relative task vector over the weight matrices,
``‖θ_e − θ_b‖ / ‖θ_b‖``, accumulated tensor by tensor in float64 (one tensor pair in memory at
a time). Norm vectors are left out: they start at 1 in every model and would hide unrelated
matrices. Two independently initialised models of the same scale give about √2 ≈ 1.41; real
fine-tunes stay far below 1 (the demo experts: 0.29 to 0.38). The default limit, 1.2, sits
between the two; the tiny test experts, perturbed by noise as large as their weights, give 1.0.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch

from mergeme.checkpoint import Checkpoint
from mergeme.validation.files import CheckpointInventory
from mergeme.validation.problems import Problem

logger = logging.getLogger(__name__)

DEFAULT_MAX_RELATIVE_TASK_VECTOR = 1.2
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def tokenizer_fingerprints(folder: Path) -> dict[str, str]:
    """``{file name: sha256 of its content}`` of the tokenizer files present in ``folder``."""
    return {
        name: hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()
        for name in TOKENIZER_FILES
        if (Path(folder) / name).is_file()
    }


def config_problems(base: CheckpointInventory, expert: CheckpointInventory) -> list[Problem]:
    """Family, sizes and vocabulary of ``expert`` against ``base`` (from config.json)."""
    b, e, label = base.config or {}, expert.config or {}, f"{expert.name!r}"
    problems = [
        Problem(
            "architecture_mismatch",
            f"{label}: config.json {key} is {e.get(key)!r}, the base has {b.get(key)!r}; "
            "experts must be fine-tunes of the base, with its architecture",
        )
        for key in ARCHITECTURE_KEYS
        if e.get(key) != b.get(key)
    ]
    if e.get("vocab_size") != b.get("vocab_size"):
        problems.append(
            Problem(
                "vocab_mismatch",
                f"{label}: config.json vocab_size is {e.get('vocab_size')!r}, the base has "
                f"{b.get('vocab_size')!r}; experts must share the base's vocabulary",
            )
        )
    return problems


def tokenizer_problems(base: CheckpointInventory, expert: CheckpointInventory) -> list[Problem]:
    """Tokenizer files of ``expert`` absent, extra, or differing in content from the base's."""
    ours, theirs = tokenizer_fingerprints(base.path), tokenizer_fingerprints(expert.path)
    differing = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
    if not differing:
        return []
    return [
        Problem(
            "tokenizer_mismatch",
            f"{expert.name!r}: tokenizer files differ from the base's (by content: {differing}); "
            "experts must share the base's tokenizer: copy the base's tokenizer files",
        )
    ]


def tensor_problems(base: CheckpointInventory, expert: CheckpointInventory) -> list[Problem]:
    """Tensor names and shapes of ``expert`` against ``base``, from the headers."""
    problems, label = [], f"{expert.name!r}"
    for name in sorted(set(base.tensors) - set(expert.tensors)):
        message = f"{label}: tensor {name!r} of the base is missing"
        problems.append(Problem("tensor_mismatch", message))
    for name in sorted(set(expert.tensors) - set(base.tensors)):
        message = f"{label}: tensor {name!r} is not in the base"
        problems.append(Problem("tensor_mismatch", message))
    for name in sorted(set(base.tensors) & set(expert.tensors)):
        ours, theirs = base.tensors[name].shape, expert.tensors[name].shape
        if ours != theirs:
            message = f"{label}: tensor {name!r} has shape {list(theirs)}, the base {list(ours)}"
            problems.append(Problem("tensor_mismatch", message))
    return problems


def relative_task_vector(base: Checkpoint, expert: Checkpoint) -> float:
    """``‖θ_e − θ_b‖ / ‖θ_b‖`` over the weight matrices (ndim ≥ 2) the two share, streamed
    one tensor pair at a time in float64."""
    difference = reference = 0.0
    for name in base.tensor_names():
        if name not in expert or len(base.shape(name)) < 2:
            continue
        theta_b = base.get(name).double()  # [out, in]
        theta_e = expert.get(name).double()  # [out, in]
        # a NaN or Inf is reported by the statistics suite; it must not decide this measure
        finite = torch.isfinite(theta_b) & torch.isfinite(theta_e)  # [out, in]
        difference += float((theta_e - theta_b)[finite].square().sum())
        reference += float(theta_b[finite].square().sum())
    return math.sqrt(difference / reference) if reference > 0 else math.inf


def derivation_problem(base: Checkpoint, expert: Checkpoint, limit: float) -> Problem | None:
    """A ``not_derived`` problem when ``expert``'s task vector is larger than ``limit`` × the
    base's weights."""
    ratio = relative_task_vector(base, expert)
    logger.info("relative task vector of %s: %.3f", expert.name, ratio)
    if ratio <= limit:
        return None
    return Problem(
        "not_derived",
        f"{expert.name!r}: its task vector is {ratio:.2f} × the base's weights "
        f"(‖θ_e − θ_b‖ / ‖θ_b‖ over the weight matrices; the limit is {limit:g}, unrelated "
        "models give about 1.41): it is not a fine-tune of this base. Use an expert trained "
        "from this base, or raise validation.max_relative_task_vector if it is one",
    )


def duplicate_problems(content_hashes: dict[str, str]) -> list[Problem]:
    """Experts whose weight files are byte-identical to an earlier expert's."""
    seen: dict[str, str] = {}
    problems = []
    for name, digest in content_hashes.items():
        if digest in seen:
            problems.append(
                Problem(
                    "duplicate_expert",
                    f"{name!r}: its weights are identical to expert {seen[digest]!r} (same "
                    "content hash); two copies add nothing to an MoE. Remove one of them",
                )
            )
        else:
            seen[digest] = name
    return problems
