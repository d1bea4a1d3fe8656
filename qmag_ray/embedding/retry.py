"""Surviving an unreliable object store: which errors are transient, and retrying them.

Two layers: the storage client's own retries (``STORE_OPTIONS``: botocore's ``standard``
retry mode with bounded connect and read timeouts, on top of s3fs's retries of throttling
errors) and, around each file read or part write, :func:`with_retries` with exponential
backoff. What still fails after that is recorded as a *transient* failure, which running the
same command again retries. Each retry can be reported to a :class:`StoreMonitor`, so that a
stalled store shows in the driver's progress line while the tasks wait.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from qmag_ray import storage

logger = logging.getLogger(__name__)

T = TypeVar("T")

READ_ATTEMPTS = 5
"""Attempts per file read (and per part write) before it counts as a transient failure."""

BACKOFF_SECONDS = 1.0
"""First wait between attempts; doubled after each, capped by ``BACKOFF_CAP_SECONDS``."""

BACKOFF_CAP_SECONDS = 20.0

STORE_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {
        "config_kwargs": {
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 30,
        }
    },
}
"""Storage client settings per protocol for the job's reads and writes (fsspec options)."""

_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def store_options(uri: str) -> dict[str, Any]:
    """The storage client settings for ``uri``'s protocol (empty for local files)."""
    proto = storage.protocol(uri)
    return dict(STORE_OPTIONS.get("s3" if proto in ("s3", "s3a") else proto, {}))


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage (connection, timeout, 5xx) rather than a bad file."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {
        "BotoCoreError",
        "ClientError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
        "HTTPClientError",
    }:
        return True
    return isinstance(exc, OSError)  # s3fs maps 5xx and unknown store errors to plain OSError


class StoreMonitor:
    """A tiny Ray actor (no CPU) that counts store retries for the progress line."""

    def __init__(self) -> None:
        self.retries = 0
        self.last = ""
        self.when = 0.0

    def retrying(self, what: str, error: str) -> None:
        self.retries += 1
        self.last = f"{what}: {error}"
        self.when = time.time()

    def snapshot(self) -> dict[str, Any]:
        return {"retries": self.retries, "last": self.last, "when": self.when}


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = READ_ATTEMPTS,
    backoff: float = BACKOFF_SECONDS,
    monitor: Any = None,
) -> T:
    """Call ``fn``; retry transient errors with exponential backoff, re-raise the last one.

    ``what`` names the object (redacted URI) for the log and the monitor; permanent errors
    (not found, permission denied) are raised at once.
    """
    delay = backoff
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            message = f"{type(exc).__name__}: {first_line(exc)}"
            if monitor is not None:  # informs the progress line only
                with contextlib.suppress(Exception):
                    monitor.retrying.remote(what, message)
            if attempt == attempts:
                raise
            logger.info(
                "retrying %s in %.1f s (attempt %d/%d): %s", what, delay, attempt, attempts, message
            )
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP_SECONDS)
    raise AssertionError("unreachable")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
