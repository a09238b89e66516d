"""Retry policy of the network steps (fetch, register): back-off, and no retry for errors
that another attempt cannot fix."""

from __future__ import annotations

from typing import Any

from mergeme.errors import MergemeError, RegistryUnavailable

# seconds before the 1st, 2nd and 3rd retry; jitter spreads retries of parallel runs
RETRY_DELAYS = [2, 10, 30]
RETRY_JITTER = 0.2


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry on a registry or network outage and on unexpected errors; not on mergeme's own
    errors about bad input (a missing model, a bad config), which a retry cannot fix."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            error = state.result(raise_on_failure=False)
        except Exception as exc:  # a result that cannot be read: treat as transient
            error = exc
    if isinstance(error, RegistryUnavailable):
        return True
    return not isinstance(error, MergemeError)
