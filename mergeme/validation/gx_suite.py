"""The Great Expectations suite that every expert's tensor statistics must pass before a merge.

Great Expectations is imported inside the functions: the import costs seconds, and only the
validation step needs it. Each validation runs in its own ephemeral (in-memory) data context,
which costs a few milliseconds and keeps validations independent: no suite, result or Data Docs
page of an earlier call leaks into a later one. GX 1.24 sends no usage statistics (its analytics
code is gone), and the context's ``analytics_enabled`` is set to False all the same.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mergeme.validation.tensor_stats import TENSOR_STATS_COLUMNS

logger = logging.getLogger(__name__)

SUITE_NAME = "mergeme_tensor_stats"
# an ephemeral context already holds a site named "local_site" (in a temp dir): use another
DOCS_SITE_NAME = "mergeme_tensor_stats_docs"
# every expectation carries its check name in its meta, to find its result again: GX returns
# results in its own order, not the suite's
CHECK_KEY = "mergeme_check"
# the default of validation.max_abs_value
DEFAULT_MAX_ABS_VALUE = 1e4


@dataclass
class TensorStatsReport:
    """The outcome of validating a tensor statistics table.

    Attributes:
        success: every expectation of the suite passed.
        failures: one readable line per offending row (expert, tensor, value, what was expected
            and what to do), or per failed table-level expectation.
        result_json: the GX validation result as a JSON-serialisable dict.
        docs_index: the rendered Data Docs ``index.html``, when a docs folder was given.
    """

    success: bool
    failures: list[str]
    result_json: dict
    docs_index: Path | None = None


@dataclass(frozen=True)
class _RowCheck:
    """A per-row expectation on one column, and how to explain a row that fails it."""

    column: str
    expected: str
    fix: str


def _row_checks(allowed_dtypes: list[str], max_abs_limit: float) -> dict[str, _RowCheck]:
    return {
        "finite": _RowCheck(
            "finite_fraction", "1.0: every value finite", "retrain or re-export that checkpoint"
        ),
        "dtype": _RowCheck(
            "dtype",
            f"one of {allowed_dtypes}",
            f"cast the checkpoint to one of {allowed_dtypes}; F64, F32, BF16 and F16 can also "
            "be listed in validation.allowed_dtypes, other dtypes cannot be merged",
        ),
        "max_abs": _RowCheck(
            "max_abs",
            f"at most {max_abs_limit:g}",
            "look for diverged training or a broken conversion, or raise "
            "validation.max_abs_value if such weights are intended",
        ),
        "std": _RowCheck(
            "std", "at least 0", "the table is corrupt; rebuild it with tensor_stats_table"
        ),
        "numel": _RowCheck(
            "numel", "at least 1", "an empty tensor cannot be merged; re-export that checkpoint"
        ),
    }


def _build_suite(allowed_dtypes: list[str], max_abs_limit: float) -> Any:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    expectations = {
        "columns": gxe.ExpectTableColumnsToMatchSet(
            column_set=TENSOR_STATS_COLUMNS, exact_match=False
        ),
        "rows": gxe.ExpectTableRowCountToBeBetween(min_value=1),
        "tensor_named": gxe.ExpectColumnValuesToNotBeNull(column="tensor"),
        "tensor_unique": gxe.ExpectCompoundColumnsToBeUnique(column_list=["expert", "tensor"]),
        "finite": gxe.ExpectColumnValuesToBeBetween(
            column="finite_fraction", min_value=1.0, max_value=1.0
        ),
        "dtype": gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=allowed_dtypes),
        "max_abs": gxe.ExpectColumnValuesToBeBetween(column="max_abs", max_value=max_abs_limit),
        "std": gxe.ExpectColumnValuesToBeBetween(column="std", min_value=0),
        "numel": gxe.ExpectColumnValuesToBeBetween(column="numel", min_value=1),
    }
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for check, expectation in expectations.items():
        expectation.meta = {CHECK_KEY: check}
        suite.add_expectation(expectation)
    return suite


def _ephemeral_context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX pins this module's logger to INFO, so every ephemeral context would log a line about
    # a temp docs folder that it has already deleted, whatever the application's log level
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.enable_analytics(False)
    # GX draws one progress bar per validation otherwise, on every call
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _validate_batch(batch_definition: Any, suite: Any, table: pd.DataFrame) -> Any:
    batch = batch_definition.get_batch(batch_parameters={"dataframe": table})
    return batch.validate(suite, result_format="COMPLETE")


def _validate_with_docs(
    context: Any,
    batch_definition: Any,
    suite: Any,
    table: pd.DataFrame,
    docs_dir: Path,
    site_name: str = DOCS_SITE_NAME,
) -> Any:
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    # an absolute base_directory: a relative one would be read against the context root
    context.add_data_docs_site(
        site_name,
        {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )

    # batch.validate() stores nothing; a checkpoint run keeps the result for the docs. Naming
    # the site keeps GX from also writing the default "local_site" into a temp dir.
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=suite.name,
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="update_docs", site_names=[site_name])],
            result_format="COMPLETE",
        )
    )
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": table})
    # the update-docs action has already built the site, index included
    (result,) = checkpoint_result.run_results.values()
    return result


def validate_tensor_stats(
    df: pd.DataFrame,
    *,
    allowed_dtypes: list[str],
    max_abs_limit: float = DEFAULT_MAX_ABS_VALUE,
    docs_dir: Path | None = None,
) -> TensorStatsReport:
    """Validate a table from ``tensor_stats_table`` (one or more experts) with the suite.

    The suite: all columns present, at least one row, every tensor named and unique within its
    expert, finite_fraction 1.0, dtype in ``allowed_dtypes``, max_abs at most ``max_abs_limit``,
    std at least 0, numel at least 1.

    Args:
        df: the statistics table; its index is ignored (rows are reported by expert and tensor).
        allowed_dtypes: safetensors dtype codes a checkpoint may use, such as ``["BF16"]``.
        max_abs_limit: the largest absolute weight value accepted (the config's
            ``validation.max_abs_value``).
        docs_dir: when given, Data Docs HTML is written there (and nowhere else).

    Returns:
        A report; it does not raise when the table fails the suite.

    Raises:
        ValueError: ``allowed_dtypes`` is empty or ``max_abs_limit`` is not a positive number.
    """
    if not allowed_dtypes:
        raise ValueError("allowed_dtypes is empty; list the dtype codes to accept, e.g. ['BF16']")
    if not max_abs_limit > 0 or math.isinf(max_abs_limit):
        raise ValueError(f"max_abs_limit must be a positive finite number, not {max_abs_limit}")
    # reported row indexes are index labels: make them positions
    table = df.reset_index(drop=True)

    # context, data source, then suite: the suite must be added to the context that validates
    context = _ephemeral_context()
    batch_definition = (
        context.data_sources.add_pandas("tensor_stats")
        .add_dataframe_asset("tensor_stats")
        .add_batch_definition_whole_dataframe("whole_table")
    )
    suite = context.suites.add(_build_suite(list(allowed_dtypes), max_abs_limit))

    if docs_dir is None:
        result = _validate_batch(batch_definition, suite, table)
        docs_index = None
    else:
        docs_dir = Path(docs_dir).resolve()
        docs_dir.mkdir(parents=True, exist_ok=True)
        result = _validate_with_docs(context, batch_definition, suite, table, docs_dir)
        docs_index = docs_dir / "index.html"

    failures = _explain_failures(result, table, _row_checks(list(allowed_dtypes), max_abs_limit))
    experts = sorted(table["expert"].dropna().unique()) if "expert" in table else []
    logger.info(
        "suite %s on %d tensors of experts %s: %s",
        SUITE_NAME,
        len(table),
        experts,
        "passed" if result.success else f"{len(failures)} failures",
    )
    return TensorStatsReport(
        success=bool(result.success),
        failures=failures,
        result_json=result.to_json_dict(),
        docs_index=docs_index,
    )


# -- failure messages ---------------------------------------------------------------------


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _row_name(table: pd.DataFrame, index: int) -> tuple[str, str]:
    row = table.iloc[index]
    return str(row.get("expert")), str(row.get("tensor"))


def _exception_messages(exception_info: dict) -> list[str]:
    # one expectation reports either one exception or one per failed metric
    if "exception_message" in exception_info:
        infos = [exception_info]
    else:
        infos = list(exception_info.values())
    return sorted({info["exception_message"] for info in infos if info.get("raised_exception")})


def _explain_failures(
    result: Any, table: pd.DataFrame, row_checks: dict[str, _RowCheck]
) -> list[str]:
    by_check = {r.expectation_config.meta.get(CHECK_KEY): r for r in result.results}
    missing = sorted(set(TENSOR_STATS_COLUMNS) - set(table.columns))
    failures: list[str] = []
    if missing:
        failures.append(
            f"the statistics table lacks the columns {missing}; build it with tensor_stats_table"
        )
    if not by_check["rows"].success:
        failures.append("the statistics table has no rows; check that the checkpoint holds weights")

    # suite order, then row order
    for check in ("tensor_named", "tensor_unique", *row_checks):
        expectation_result = by_check[check]
        if expectation_result.success:
            continue
        kwargs = expectation_result.expectation_config.kwargs
        columns = kwargs.get("column_list") or [kwargs.get("column")]
        messages = _exception_messages(expectation_result.exception_info or {})
        if messages:
            # an expectation on a missing column is already covered by the columns message
            if not set(columns) & set(missing):
                failures.extend(f"check {check!r} could not run: {m}" for m in messages)
            continue
        indexes = expectation_result.result.get("unexpected_index_list", [])
        if check == "tensor_named":
            failures.extend(_unnamed_tensor_failures(table, indexes))
        elif check == "tensor_unique":
            failures.extend(_duplicate_tensor_failures(table, indexes))
        else:
            failures.extend(_row_failures(table, indexes, row_checks[check]))
    return failures


def _row_failures(table: pd.DataFrame, indexes: list[int], check: _RowCheck) -> list[str]:
    failures = []
    for index in indexes:
        expert, tensor = _row_name(table, index)
        value = _format_value(table.iloc[index][check.column])
        failures.append(
            f"expert {expert!r}: tensor {tensor!r} has {check.column} {value} "
            f"(expected {check.expected}); {check.fix}"
        )
    return failures


def _unnamed_tensor_failures(table: pd.DataFrame, indexes: list[int]) -> list[str]:
    return [
        f"expert {_row_name(table, index)[0]!r}: row {index} names no tensor (expected every row "
        "to name one); rebuild the table with tensor_stats_table"
        for index in indexes
    ]


def _duplicate_tensor_failures(table: pd.DataFrame, indexes: list[int]) -> list[str]:
    counts: dict[tuple[str, str], int] = {}
    for index in indexes:
        key = _row_name(table, index)
        counts[key] = counts.get(key, 0) + 1
    return [
        f"expert {expert!r}: tensor {tensor!r} appears in {count} rows (expected once per "
        "expert); tables of several checkpoints need distinct expert names"
        for (expert, tensor), count in counts.items()
    ]
