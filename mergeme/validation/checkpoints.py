"""Validate step: every checkpoint is readable, finite, and compatible with the base, before
anything is merged. All problems are gathered, then reported together."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from mergeme.checkpoint import Checkpoint, compare_tensors
from mergeme.errors import CheckpointError, MergemeError, UnsupportedArchitectureError
from mergeme.merge.architectures import architecture_for

logger = logging.getLogger(__name__)

ALLOWED_DTYPES = ["F32", "BF16", "F16"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass
class ValidationReport:
    """The outcome of validation and where its evidence was written."""

    success: bool
    problems: list[str] = field(default_factory=list)
    stats_csv: str | None = None
    gx_result_json: str | None = None
    docs_index: str | None = None


class ValidationFailed(MergemeError):
    """Raised when validation finds problems; ``report`` has them all and its evidence."""

    def __init__(self, report: ValidationReport):
        self.report = report
        listed = "\n".join(f"  - {problem}" for problem in report.problems)
        super().__init__(f"validation failed with {len(report.problems)} problem(s):\n{listed}")


def tokenizer_fingerprint(folder: Path) -> str | None:
    """sha256 of the tokenizer files' content (not their sizes); None if there are none."""
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            found = True
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest() if found else None


def compatibility_problems(base: Checkpoint, expert: Checkpoint) -> list[str]:
    """What keeps ``expert`` from being merged with ``base`` (architecture, tensors, vocab)."""
    problems = []
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if expert.config.get(key) != base.config.get(key):
            problems.append(
                f"{expert.name!r}: config.json {key} is {expert.config.get(key)!r}, the base has "
                f"{base.config.get(key)!r}; experts must share the base's architecture"
            )
    if problems:
        return problems  # tensor shapes would only repeat the same mismatch
    problems += compare_tensors(base, expert)
    if tokenizer_fingerprint(expert.path) != tokenizer_fingerprint(base.path):
        problems.append(
            f"{expert.name!r}: tokenizer files differ from the base's; experts must share the "
            "base's tokenizer and vocabulary"
        )
    return problems


def _open_all(checkpoints: dict[str, Path], problems: list[str]) -> dict[str, Checkpoint]:
    opened = {}
    for name, path in checkpoints.items():
        try:
            opened[name] = Checkpoint(path, name=name)
        except CheckpointError as exc:
            problems.append(str(exc))
    return opened


def validate_checkpoints(
    base: tuple[str, Path], experts: dict[str, Path], report_dir: Path
) -> ValidationReport:
    """Check ``base`` and ``experts``; write the statistics table, GX result and Data Docs
    into ``report_dir``.

    Returns:
        The report; ``success`` is false when any problem was found (nothing is raised here,
        so that a failed report can still be saved).
    """
    from mergeme.validation.gx_suite import validate_tensor_stats
    from mergeme.validation.tensor_stats import tensor_stats_table

    report_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    if len(experts) < 2:
        problems.append(f"{len(experts)} expert(s) configured; an MoE needs at least 2")
    opened = _open_all({base[0]: base[1], **experts}, problems)
    base_checkpoint = opened.get(base[0])
    try:
        if base_checkpoint is not None:
            try:
                architecture_for(base_checkpoint.config)
            except UnsupportedArchitectureError as exc:
                problems.append(f"{base[0]!r}: {exc}")
            for name in experts:
                if name in opened:
                    problems += compatibility_problems(base_checkpoint, opened[name])

        tables = [tensor_stats_table(checkpoint, name) for name, checkpoint in opened.items()]
    finally:
        for checkpoint in opened.values():
            checkpoint.close()

    report = ValidationReport(success=False)
    if tables:
        stats = pd.concat(tables, ignore_index=True)
        report.stats_csv = str(report_dir / "tensor_stats.csv")
        stats.to_csv(report.stats_csv, index=False)
        gx_report = validate_tensor_stats(
            stats, allowed_dtypes=ALLOWED_DTYPES, docs_dir=report_dir / "data_docs"
        )
        problems += gx_report.failures
        report.gx_result_json = str(report_dir / "gx_tensor_stats.json")
        Path(report.gx_result_json).write_text(json.dumps(gx_report.result_json, indent=2))
        report.docs_index = str(gx_report.docs_index) if gx_report.docs_index else None

    report.problems = problems
    report.success = not problems
    (report_dir / "validation_report.json").write_text(json.dumps(asdict(report), indent=2))
    if problems:
        logger.warning("validation found %d problem(s)", len(problems))
    return report
