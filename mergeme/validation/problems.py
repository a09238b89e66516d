"""The vocabulary of validation problems: every problem has a machine-checkable ``kind`` and a
message that names the expert, file, tensor, key or row at fault and says what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

ProblemKind = Literal[
    # a checkpoint's config.json
    "config_missing",
    "config_unparseable",
    "remote_code",
    # a checkpoint's weight files, checked from their headers before anything is loaded
    "weights_missing",
    "pickle_weights",
    "shard_missing",
    "shard_truncated",
    "header_invalid",
    "index_invalid",
    "index_tensor_absent",
    "index_path_escape",
    "shape_config_mismatch",
    "tensor_unexpected",
    # the tensor statistics suite
    "non_finite",
    "dtype_not_allowed",
    "stats_suite",
    # the experts against the base and each other
    "too_few_experts",
    "architecture_unsupported",
    "architecture_mismatch",
    "vocab_mismatch",
    "tokenizer_mismatch",
    "tensor_mismatch",
    "not_derived",
    "duplicate_expert",
    # the calibration and eval files
    "data_missing",
    "data_empty",
    "data_not_utf8",
    "data_not_json",
    "data_not_string",
    "data_columns",
    "data_text_empty",
    "data_length",
    "data_unknown_domain",
    "data_domain_mismatch",
    "data_leak",
    "data_uncommitted",
    "data_untracked",
    "data_lock_unusable",
    "data_suite",
]

PROBLEM_KINDS: tuple[str, ...] = get_args(ProblemKind)


@dataclass(frozen=True)
class Problem:
    """One thing that keeps the inputs from being merged."""

    kind: ProblemKind
    message: str

    def __post_init__(self) -> None:
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}; add it to ProblemKind")
