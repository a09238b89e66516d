"""The data suite on hand-written rows: every odd value is a named problem, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeme.validation.data_suite import (
    DataSettings,
    build_data_table,
    normalise_whitespace,
    validate_data_table,
)

DOMAINS = ["code", "math"]


def write_data(root: Path, extra: dict[tuple[str, str], list[str]] | None = None) -> DataSettings:
    """Two domains with one clean calibration and eval row each, plus ``extra`` raw lines."""
    for domain in DOMAINS:
        for split in ("calibration", "eval"):
            lines = [json.dumps({"domain": domain, "text": f"A {split} text about {domain}."})]
            lines += (extra or {}).get((domain, split), [])
            (root / domain).mkdir(parents=True, exist_ok=True)
            (root / domain / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return DataSettings(
        root=root, domains=DOMAINS, calibration_split="calibration", eval_split="eval"
    )


def problems_of(settings: DataSettings) -> list:
    table, problems = build_data_table(settings)
    suite_problems, _, _ = validate_data_table(table, settings, None)
    return problems + suite_problems


def test_clean_rows_pass(tmp_path):
    assert problems_of(write_data(tmp_path)) == []


def test_a_null_domain_is_named(tmp_path):
    line = json.dumps({"domain": None, "text": "Who labelled this?"})
    [problem] = problems_of(write_data(tmp_path, {("math", "eval"): [line]}))
    assert problem.kind == "data_unknown_domain"
    assert f"{tmp_path / 'math' / 'eval.jsonl'} line 2: domain is null" in problem.message


@pytest.mark.parametrize(
    ("field", "value", "found"),
    [
        ("text", ["a"], "an array"),
        ("text", {"a": 1}, "an object"),
        ("text", 7, "a number"),
        ("domain", ["math"], "an array"),
        ("domain", True, "a boolean"),
    ],
)
def test_a_non_string_value_is_named_not_a_crash(tmp_path, field, value, found):
    record = {"domain": "code", "text": "print(1)", field: value}
    [problem] = problems_of(write_data(tmp_path, {("code", "calibration"): [json.dumps(record)]}))
    assert problem.kind == "data_not_string"
    where = f"{tmp_path / 'code' / 'calibration.jsonl'} line 2: field {field!r} is {found}"
    assert problem.message.startswith(where)


def test_a_row_labelled_with_another_folders_domain_is_refused(tmp_path):
    line = json.dumps({"domain": "code", "text": "def f(): pass"})
    [problem] = problems_of(write_data(tmp_path, {("math", "calibration"): [line]}))
    assert problem.kind == "data_domain_mismatch"
    assert "domain is 'code' (expected 'math', the domain of its folder" in problem.message


def test_a_leak_is_found_through_whitespace_differences(tmp_path):
    calibration = json.dumps({"domain": "math", "text": "Two plus two\tis four. "})
    leaked = json.dumps({"domain": "code", "text": "  Two  plus two is\nfour."})
    # the same words with other case or punctuation are a different text
    other = json.dumps({"domain": "code", "text": "two plus two is four!"})
    settings = write_data(
        tmp_path, {("math", "calibration"): [calibration], ("code", "eval"): [leaked, other]}
    )
    [problem] = problems_of(settings)
    assert problem.kind == "data_leak"
    assert f"{tmp_path / 'code' / 'eval.jsonl'} line 2:" in problem.message


def test_whitespace_normalisation():
    assert normalise_whitespace("  a\t b\n\nc  ") == "a b c"
    assert normalise_whitespace("a b") == normalise_whitespace("a\u00a0b")  # no-break space
