"""Validate step: every checkpoint is intact, finite, and compatible with the base, before
anything is merged. All problems are gathered, then reported together.

Order: metadata first (config.json, index, shard headers, shapes against the config), so a
broken file is named before anything is read; then compatibility with the base; then one
streaming pass per checkpoint for the statistics table and its Great Expectations suite.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from mergeme.checkpoint import Checkpoint, hash_weight_files
from mergeme.errors import CheckpointError, MergemeError, UnsupportedArchitectureError
from mergeme.merge.families import architecture_for
from mergeme.validation import compatibility as compat
from mergeme.validation.files import CheckpointInventory, inspect_checkpoint
from mergeme.validation.gx_suite import DEFAULT_MAX_ABS_VALUE
from mergeme.validation.problems import Problem
from mergeme.validation.shapes import shape_problems

logger = logging.getLogger(__name__)

ALLOWED_DTYPES = ["F32", "BF16", "F16"]


@dataclass
class ValidationReport:
    """The outcome of validation and where its evidence was written.

    ``problems`` are the messages; ``findings`` the same problems as ``{"kind", "message"}``.
    """

    success: bool
    problems: list[str] = field(default_factory=list)
    stats_csv: str | None = None
    gx_result_json: str | None = None
    docs_index: str | None = None
    findings: list[dict] = field(default_factory=list)
    data_table_csv: str | None = None
    data_gx_result_json: str | None = None
    data_docs_index: str | None = None
    report_json: str | None = None

    def add(self, problems: list[Problem]) -> None:
        self.findings += [asdict(problem) for problem in problems]
        self.problems += [problem.message for problem in problems]

    @property
    def kinds(self) -> list[str]:
        return [finding["kind"] for finding in self.findings]


class ValidationFailed(MergemeError):
    """Raised when validation finds problems; ``report`` has them all and its evidence."""

    def __init__(self, report: ValidationReport):
        self.report = report
        listed = "\n".join(f"  - [{f['kind']}] {f['message']}" for f in report.findings)
        super().__init__(f"validation failed with {len(report.problems)} problem(s):\n{listed}")

    @property
    def kinds(self) -> list[str]:
        return self.report.kinds


def _suite_kind(message: str) -> str:
    # the suite's row messages name the column that failed ("has finite_fraction 0.5")
    if " has finite_fraction " in message:
        return "non_finite"
    if " has dtype " in message:
        return "dtype_not_allowed"
    return "stats_suite"


def _pair_problems(
    base: CheckpointInventory, expert: CheckpointInventory, opened: dict[str, Checkpoint], limit
) -> list[Problem]:
    problems = compat.config_problems(base, expert)
    if problems:
        return problems  # tensor shapes would only repeat the same mismatch
    problems = compat.tokenizer_problems(base, expert)
    if base.readable and expert.readable:  # else the headers listed no tensors to compare
        problems += compat.tensor_problems(base, expert)
    if not problems and base.name in opened and expert.name in opened:
        derived = compat.derivation_problem(opened[base.name], opened[expert.name], limit)
        problems += [derived] if derived else []
    return problems


def _open_readable(
    inventories: dict[str, CheckpointInventory], allow_pickle: bool = False
) -> dict[str, Checkpoint]:
    opened = {}
    for name, inventory in inventories.items():
        if not inventory.readable:
            continue
        try:
            opened[name] = Checkpoint(inventory.path, name=name, allow_pickle=allow_pickle)
        except CheckpointError as exc:
            inventory.problems.append(Problem("weights_missing", str(exc)))
    return opened


def _stats_evidence(
    opened: dict[str, Checkpoint],
    report: ValidationReport,
    report_dir: Path,
    dtypes: list[str],
    max_abs_value: float,
) -> None:
    from mergeme.validation.gx_suite import validate_tensor_stats
    from mergeme.validation.tensor_stats import tensor_stats_table

    tables = [tensor_stats_table(checkpoint, name) for name, checkpoint in opened.items()]
    if not tables:
        return
    stats = pd.concat(tables, ignore_index=True)
    report.stats_csv = str(report_dir / "tensor_stats.csv")
    stats.to_csv(report.stats_csv, index=False)
    gx_report = validate_tensor_stats(
        stats, allowed_dtypes=dtypes, max_abs_limit=max_abs_value, docs_dir=report_dir / "data_docs"
    )
    report.add([Problem(_suite_kind(m), m) for m in gx_report.failures])  # type: ignore[arg-type]
    report.gx_result_json = str(report_dir / "gx_tensor_stats.json")
    Path(report.gx_result_json).write_text(json.dumps(gx_report.result_json, indent=2))
    report.docs_index = str(gx_report.docs_index) if gx_report.docs_index else None


def validate_checkpoints(
    base: tuple[str, Path],
    experts: dict[str, Path],
    report_dir: Path,
    *,
    allowed_dtypes: list[str] | None = None,
    max_relative_task_vector: float = compat.DEFAULT_MAX_RELATIVE_TASK_VECTOR,
    allow_pickle: bool = False,
    allow_remote_code: bool = False,
    content_hashes: dict[str, str] | None = None,
    max_abs_value: float = DEFAULT_MAX_ABS_VALUE,
) -> ValidationReport:
    """Check ``base`` and ``experts``; write the statistics table, GX result and Data Docs
    into ``report_dir``.

    Returns:
        The report; ``success`` is false when any problem was found (nothing is raised here,
        so that a failed report can still be saved).
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    report = ValidationReport(success=False)
    if len(experts) < 2:
        message = f"{len(experts)} expert(s) configured; an MoE needs at least 2: add experts"
        report.add([Problem("too_few_experts", message)])

    # metadata of every checkpoint, before anything is loaded
    inventories = {
        name: inspect_checkpoint(
            name, path, allow_pickle=allow_pickle, allow_remote_code=allow_remote_code
        )
        for name, path in {base[0]: base[1], **experts}.items()
    }
    for inventory in inventories.values():
        inventory.problems += shape_problems(inventory) if inventory.readable else []

    opened = _open_readable(inventories, allow_pickle)
    for inventory in inventories.values():
        report.add(inventory.problems)
    try:
        base_inventory = inventories[base[0]]
        known_type = all(p.kind != "architecture_unsupported" for p in base_inventory.problems)
        if base_inventory.config is not None and known_type:
            try:
                architecture_for(base_inventory.config)
            except UnsupportedArchitectureError as exc:
                report.add([Problem("architecture_unsupported", f"{base[0]!r}: {exc}")])
        for name in experts:
            if base_inventory.config is not None and inventories[name].config is not None:
                report.add(
                    _pair_problems(
                        base_inventory, inventories[name], opened, max_relative_task_vector
                    )
                )
        hashes = content_hashes or {
            name: hash_weight_files(inventories[name].path) for name in experts if name in opened
        }
        report.add(compat.duplicate_problems({n: hashes[n] for n in experts if n in hashes}))
        dtypes = allowed_dtypes or ALLOWED_DTYPES
        _stats_evidence(opened, report, report_dir, dtypes, max_abs_value)
    finally:
        for checkpoint in opened.values():
            checkpoint.close()

    report.success = not report.problems
    if report.problems:
        logger.warning("checkpoint validation found %d problem(s)", len(report.problems))
    write_report(report, report_dir)
    return report


def write_report(report: ValidationReport, report_dir: Path) -> Path:
    """Write ``validation_report.json`` into ``report_dir``; returns its path."""
    path = Path(report_dir) / "validation_report.json"
    report.report_json = str(path)
    path.write_text(json.dumps(asdict(report), indent=2))
    return path
