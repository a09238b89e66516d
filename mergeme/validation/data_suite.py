"""The calibration and eval files, one row per line, validated by a Great Expectations suite.

Files are read as raw bytes, line by line, so a line that is not UTF-8 is named with its file
and line number instead of failing the whole read. A line that is not a JSON object, or whose
``domain`` or ``text`` is neither a string nor null, is a problem of its own and no row. Every
other line becomes a row of a table (file, line, fields, domain, text, its length, whether it
decoded, whether its label is its folder's domain, whether an eval text also occurs in
calibration) that the suite ``mergeme_data`` checks.

The layout is ``<root>/<domain>/<split>.jsonl``: a row labelled with another expert's domain
than its folder's is refused. An eval text leaks when it equals a calibration text after
whitespace is normalised (leading and trailing whitespace dropped, every run of whitespace
made one space); case and punctuation still count.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mergeme.data import split_path
from mergeme.validation.problems import Problem

logger = logging.getLogger(__name__)

DATA_SUITE_NAME = "mergeme_data"
DATA_DOCS_SITE = "mergeme_data_docs"
EXPECTED_FIELDS = "domain,text"
CHECK_KEY = "mergeme_check"


@dataclass(frozen=True)
class DataSettings:
    """Which files to read and the bounds their rows must keep."""

    root: Path
    domains: list[str]
    calibration_split: str
    eval_split: str
    min_text_chars: int = 1
    max_text_chars: int = 20_000


# JSON's names for the Python types json.loads returns
JSON_TYPES = {dict: "an object", list: "an array", bool: "a boolean", int: "a number"}
JSON_TYPES[float] = "a number"
STRING_FIELDS = ("domain", "text")


@dataclass(frozen=True)
class _RowCheck:
    kind: str
    column: str
    expected: str
    fix: str


def normalise_whitespace(text: str) -> str:
    """``text`` stripped, with every run of whitespace (spaces, tabs, newlines) one space."""
    return " ".join(text.split())


def _non_string_problem(path: Path, number: int, record: dict) -> Problem | None:
    """A ``data_not_string`` problem when ``domain`` or ``text`` holds a non-string value."""
    for name in STRING_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            found = JSON_TYPES.get(type(value), type(value).__name__)
            return Problem(
                "data_not_string",
                f"{path} line {number}: field {name!r} is {found}, not a string; each line "
                'must be {"domain": "<label>", "text": "<text>"}: fix or regenerate the file '
                "(`dvc repro data`)",
            )
    return None


def _read_lines(path: Path, split: str, folder_domain: str) -> tuple[list[dict], list[Problem]]:
    rows, problems = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line, utf8_valid = raw.decode("utf-8"), True
        except UnicodeDecodeError as exc:
            line, utf8_valid = raw.decode("utf-8", errors="replace"), False
            logger.debug("%s line %d: %s", path, number, exc)
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            problems.append(
                Problem(
                    "data_not_json",
                    f"{path} line {number}: not a JSON object ({exc}); each line must be "
                    '{"domain": ..., "text": ...}',
                )
            )
            continue
        wrong_type = _non_string_problem(path, number, record)
        if wrong_type is not None:
            problems.append(wrong_type)
            continue
        text = record.get("text")
        rows.append(
            {
                "split": split,
                "file": str(path),
                "line": number,
                "folder_domain": folder_domain,
                "fields": ",".join(sorted(record)),
                "domain": record.get("domain"),
                "text": text,
                "text_chars": len(text.strip()) if isinstance(text, str) else 0,
                "utf8_valid": utf8_valid,
            }
        )
    return rows, problems


def build_data_table(settings: DataSettings) -> tuple[pd.DataFrame, list[Problem]]:
    """One row per non-blank line of every configured domain's calibration and eval file.

    Returns:
        The table and the problems found while reading (missing or empty files, lines that are
        not JSON objects or hold a non-string domain or text).
    """
    rows, problems = [], []
    for split in (settings.calibration_split, settings.eval_split):
        for domain in settings.domains:
            path = split_path(settings.root, domain, split)
            if not path.is_file():
                problems.append(
                    Problem(
                        "data_missing",
                        f"{path} does not exist: the {split} split of domain {domain!r} is "
                        "needed; run `dvc repro data` or fix data.root in the config",
                    )
                )
                continue
            found, read_problems = _read_lines(path, split, domain)
            problems += read_problems
            if not found and not read_problems:
                problems.append(
                    Problem(
                        "data_empty",
                        f"{path} has no rows; the {split} split of {domain!r} needs at least "
                        "one text: regenerate it with `dvc repro data`",
                    )
                )
            rows += found
    table = pd.DataFrame(
        rows,
        columns=["split", "file", "line", "folder_domain", "fields", "domain", "text"]
        + ["text_chars", "utf8_valid"],
    )
    # a label that is no expert's domain is reported as unknown, not also as misplaced
    known = table["domain"].isin(settings.domains)
    table["in_own_folder"] = ~known | (table["domain"] == table["folder_domain"])
    normalised = table["text"].map(lambda t: normalise_whitespace(t) if isinstance(t, str) else t)
    is_calibration = table["split"] == settings.calibration_split
    calibration = set(normalised[is_calibration].dropna())
    table["leaked"] = (table["split"] == settings.eval_split) & normalised.isin(calibration)
    return table, problems


def _checks(settings: DataSettings) -> dict[str, _RowCheck]:
    regenerate = "fix or regenerate the file (`dvc repro data`)"
    return {
        "fields": _RowCheck(
            "data_columns", "fields", f"exactly the fields {EXPECTED_FIELDS!r}", regenerate
        ),
        "utf8": _RowCheck("data_not_utf8", "utf8_valid", "valid UTF-8", "re-save it as UTF-8"),
        "non_empty": _RowCheck("data_text_empty", "text_chars", "a non-empty text", regenerate),
        "length": _RowCheck(
            "data_length",
            "text_chars",
            f"{settings.min_text_chars} to {settings.max_text_chars} characters",
            "shorten the text or change validation.min_text_chars / max_text_chars",
        ),
        "domain_present": _RowCheck(
            "data_unknown_domain",
            "domain",
            f"a domain label, one of the experts' domains {settings.domains}",
            "label the row with its folder's domain",
        ),
        "domain": _RowCheck(
            "data_unknown_domain",
            "domain",
            f"one of the experts' domains {settings.domains}",
            "fix the label or configure an expert for that domain",
        ),
        "folder": _RowCheck(
            "data_domain_mismatch",
            "domain",
            "the domain of its folder, <root>/<domain>/<split>.jsonl",
            "move the row to its domain's file or fix its label",
        ),
        "leak": _RowCheck(
            "data_leak",
            "leaked",
            "an eval text that is not also in calibration (compared with whitespace normalised)",
            "remove it from one of the splits (eval must stay unseen)",
        ),
    }


def _build_suite(settings: DataSettings) -> Any:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    expectations = {
        "rows": gxe.ExpectTableRowCountToBeBetween(min_value=1),
        "fields": gxe.ExpectColumnValuesToBeInSet(column="fields", value_set=[EXPECTED_FIELDS]),
        "utf8": gxe.ExpectColumnValuesToBeInSet(column="utf8_valid", value_set=[True]),
        "non_empty": gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
        "length": gxe.ExpectColumnValuesToBeBetween(
            column="text_chars",
            min_value=settings.min_text_chars,
            max_value=settings.max_text_chars,
        ),
        # in-set expectations skip nulls: a null label needs its own check
        "domain_present": gxe.ExpectColumnValuesToNotBeNull(column="domain"),
        "domain": gxe.ExpectColumnValuesToBeInSet(column="domain", value_set=settings.domains),
        "folder": gxe.ExpectColumnValuesToBeInSet(column="in_own_folder", value_set=[True]),
        "leak": gxe.ExpectColumnValuesToBeInSet(column="leaked", value_set=[False]),
    }
    suite = gx.ExpectationSuite(name=DATA_SUITE_NAME)
    for check, expectation in expectations.items():
        expectation.meta = {CHECK_KEY: check}
        suite.add_expectation(expectation)
    return suite


def _row_problems(table: pd.DataFrame, indexes: list[int], check: _RowCheck) -> list[Problem]:
    problems = []
    for index in indexes:
        row = table.iloc[index]
        if check.kind == "data_length" and row["text_chars"] == 0:
            continue  # already reported as an empty text
        value = row[check.column]
        shown = repr(value[:60]) if isinstance(value, str) else "null" if pd.isna(value) else value
        expected = check.expected
        if check.kind == "data_domain_mismatch":
            expected = f"{row['folder_domain']!r}, {expected}"
        message = (
            f"{row['file']} line {row['line']}: {check.column} is {shown} (expected "
            f"{expected}); {check.fix}"
        )
        problems.append(Problem(check.kind, message))  # type: ignore[arg-type]
    return problems


def validate_data_table(
    table: pd.DataFrame, settings: DataSettings, docs_dir: Path | None
) -> tuple[list[Problem], dict, Path | None]:
    """Run the data suite on ``table`` (from ``build_data_table``).

    Returns:
        The problems (one per offending row, naming its file and line), the GX result as a
        JSON-ready dict, and the Data Docs ``index.html`` when ``docs_dir`` is given.
    """
    from mergeme.validation.gx_suite import (
        _ephemeral_context,
        _validate_batch,
        _validate_with_docs,
    )

    table = table.reset_index(drop=True)
    context = _ephemeral_context()
    batch_definition = (
        context.data_sources.add_pandas("data_rows")
        .add_dataframe_asset("data_rows")
        .add_batch_definition_whole_dataframe("whole_table")
    )
    suite = context.suites.add(_build_suite(settings))
    docs_index = None
    if docs_dir is None:
        result = _validate_batch(batch_definition, suite, table)
    else:
        docs_dir = Path(docs_dir).resolve()
        docs_dir.mkdir(parents=True, exist_ok=True)
        result = _validate_with_docs(
            context, batch_definition, suite, table, docs_dir, site_name=DATA_DOCS_SITE
        )
        docs_index = docs_dir / "index.html"

    checks, problems = _checks(settings), []
    for item in result.results:
        check = item.expectation_config.meta.get(CHECK_KEY)
        if item.success or check == "rows":
            continue  # an empty table is already reported per file
        indexes = item.result.get("unexpected_index_list") or []
        if check in checks and indexes:
            problems += _row_problems(table, indexes, checks[check])
        else:
            problems.append(Problem("data_suite", f"data suite check {check!r} failed"))
    logger.info("suite %s on %d rows: %d problems", DATA_SUITE_NAME, len(table), len(problems))
    return problems, result.to_json_dict(), docs_index
