"""The one place where errors become what a person can act on, and where output is made safe.

Every ``qmag-ray`` command runs inside ``handled``:

* a user error (bad flag, YAML key, missing file, unreachable store: ``ValueError`` and the
  types of ``user_error_types``) ends in ``error: <message>`` of at most two lines and exit
  code 2; any other failure in ``error: <type>: <message>`` and exit code 1; neither shows a
  traceback unless ``--debug`` or ``QMAG_RAY_DEBUG=1`` asks for it;
* everything the command prints (stdout and stderr, log records and what Ray relays from its
  workers) passes through ``redact_console``: ``user:password@`` of URIs, signed-URL query values
  and the values of credential environment variables never reach the terminal;
* Ray's known messages that tell a user nothing (``QUIET_PATTERNS``) are dropped unless
  ``--verbose``; this holds for what Ray's C++ core writes to the process's stderr below
  Python, too (``native_stderr``: file descriptor 2 is relayed line by line through the same
  filter and redaction while a command runs).

Messages are written by the code that raises: name the flag or YAML key, the URI (redacted)
and the fix. This module only shortens, redacts and prints them.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, TextIO

import typer
from typer._click.exceptions import ClickException

DEBUG_ENV = "QMAG_RAY_DEBUG"
USER_ERROR_EXIT = 2
RUN_FAILED_EXIT = 1
#: Environment variables whose values are credentials (their values are masked in output).
SECRET_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|API_KEY)", re.IGNORECASE)
MASK = "***"

#: Lines Ray prints on every command that say nothing a user can act on.
QUIET_PATTERNS = (
    re.compile(r"Token authentication is enabled for this Ray cluster"),
    # Ray's core worker (core_worker.cc, level E) on every Ray Data actor pool: Ray Data itself
    # passes its context and transform as object refs to actors it restarts (max_restarts=-1);
    # ray-project/ray#53727. Nothing the user or qmag-ray can change (max_restarts=0 would give
    # up restarting the embedding actors after a node loss).
    re.compile(r"has constructor arguments in the object store and max_restarts > 0"),
    re.compile(r"Progress will be logged because stdout is a non-interactive terminal"),
    re.compile(r"Progress bars disabled\. To enable, set"),  # we disabled them (--verbose)
    # MLflow's own INFO lines (it sets up its logger when first imported) and registry chatter
    # that the command's "registry: ..." line already says.
    re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow\."),
    re.compile(r"^Successfully registered model '"),
    re.compile(r"^Created version '\d+' of model '"),
    re.compile(r"^Registered model '.+' already exists\. Creating a new version of this model"),
    # Ray Train's line per reported result (ray/train/v2/_internal/execution/context.py), relayed
    # from its worker actors: Ray 2.60 logs it under a logger its log level does not reach;
    # `train` prints its own progress line every --log-every steps.
    re.compile(r"Reporting training result \d+: "),
    # Ray Train's PlacementGroupCleaner actor, every second or so while a training runs on a
    # machine with several Ray clusters (it looks the cluster up without an address); the
    # training is not affected (README, Training).
    re.compile(r"Failed to query Ray Train Controller actor state\. State API may be temporarily"),
)


def debug_enabled(flag: bool = False) -> bool:
    """``--debug`` given, or ``QMAG_RAY_DEBUG`` set to a true value."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _secret_values() -> list[str]:
    values = [v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 8]
    return sorted(set(values), key=len, reverse=True)


def redact_console(text: str) -> str:
    """``text`` without URI credentials, credential query values or secret env values."""
    from qmag_ray.tracking.sanitize import redact_text

    text = redact_text(text)
    for value in _secret_values():
        if value in text:
            text = text.replace(value, MASK)
    return text


class SafeStream(io.TextIOBase):
    """A text stream that redacts what is written and drops Ray's known noise lines.

    Writes are buffered up to a newline so that a credential split over two writes is still
    seen whole; ``flush`` (and any write of a full line) passes the text on.
    """

    def __init__(self, inner: TextIO, *, quiet: bool) -> None:
        self._inner = inner
        self._quiet = quiet
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            head, _, self._pending = self._pending.rpartition("\n")
            self._emit(head + "\n")
        return len(text)

    def _emit(self, text: str) -> None:
        if self._quiet:
            lines = text.splitlines(keepends=True)
            text = "".join(ln for ln in lines if not any(p.search(ln) for p in QUIET_PATTERNS))
        if text and not getattr(self._inner, "closed", False):
            self._inner.write(redact_console(text))

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, ""
            self._emit(pending)
        if not getattr(self._inner, "closed", False):
            self._inner.flush()

    def isatty(self) -> bool:  # libraries that kept a reference may ask after it closed
        return not getattr(self._inner, "closed", False) and self._inner.isatty()

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return bool(getattr(self._inner, "closed", False))

    def fileno(self) -> int:
        return self._inner.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._inner, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._inner, "errors", "strict")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_native = {"active": False}


def _relay(read_fd: int, out_fd: int, quiet: bool) -> None:
    """Copy lines from ``read_fd`` to ``out_fd`` (filtered, redacted) until end of file."""
    pending = b""
    try:
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except InterruptedError:  # pragma: no cover - retried by Python itself
                continue
            if chunk:
                pending += chunk
                if b"\n" not in pending:
                    continue
                chunk, _, pending = pending.rpartition(b"\n")
                chunk += b"\n"
            elif pending:
                chunk, pending = pending, b""
            else:
                break
            lines = chunk.decode("utf-8", errors="replace").splitlines(keepends=True)
            if quiet:
                lines = [ln for ln in lines if not any(p.search(ln) for p in QUIET_PATTERNS)]
            text = redact_console("".join(lines)) if lines else ""
            if text:
                with suppress(OSError):
                    os.write(out_fd, text.encode("utf-8", errors="replace"))
    finally:
        os.close(read_fd)
        os.close(out_fd)


@contextmanager
def native_stderr(*, quiet: bool = True) -> Iterator[None]:
    """File descriptor 2 through ``QUIET_PATTERNS`` and ``redact_text`` for the block.

    Ray's C++ core worker writes its error lines to the process's stderr itself (not through
    ``sys.stderr``), e.g. the ``core_worker.cc`` line on every Ray Data actor pool. For the
    block, fd 2 is a pipe that a thread copies to the real stderr line by line, dropping the
    known noise unless ``quiet`` is false and redacting everything; every other line, Ray's
    real errors included, passes. Afterwards fd 2 is the real stderr again; the thread ends
    when nothing holds the pipe any more (a child started meanwhile may keep it open, and is
    then still relayed). Nested blocks (the demo runs commands in-process) use the outer one.
    """
    if _native["active"] or os.name != "posix":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (a daemon, a closed stream)
        yield
        return
    from qmag_ray.tracking import sanitize  # noqa: F401 - imported here, not in the thread

    out = os.dup(saved)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    relay = threading.Thread(
        target=_relay, args=(read_fd, out, quiet), name="qmag-ray-stderr", daemon=True
    )
    relay.start()
    _native["active"] = True
    try:
        yield
    finally:
        _native["active"] = False
        with suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end here: the relay sees end of file
        os.close(saved)
        relay.join(timeout=5)


@contextmanager
def safe_output(*, quiet: bool = True) -> Iterator[None]:
    """Route ``sys.stdout``/``sys.stderr`` through ``SafeStream`` for the block."""
    saved = sys.stdout, sys.stderr
    if isinstance(sys.stdout, SafeStream):  # nested (the demo runs commands in-process)
        yield
        return
    sys.stdout = SafeStream(saved[0], quiet=quiet)  # type: ignore[assignment]
    sys.stderr = SafeStream(saved[1], quiet=quiet)  # type: ignore[assignment]
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError):
                stream.flush()
        sys.stdout, sys.stderr = saved


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input or the environment is wrong, not the program."""
    from qmag_ray.tracking.uri import TrackingUnreachableError

    types: list[type[BaseException]] = [
        ValueError,  # ConfigError, EmbeddingsError, PairFileError, WorkflowError...
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
        TrackingUnreachableError,
    ]
    try:
        from qmag_ray.lease import LeaseHeldError

        types.append(LeaseHeldError)
    except ImportError:  # pragma: no cover - older trees
        pass
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        types += [NoCredentialsError, PartialCredentialsError]
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    return tuple(types)


def short_message(exc: BaseException, *, limit: int = 2, width: int = 400) -> str:
    """The exception's message cut to ``limit`` lines (each at most ``width`` characters)."""
    text = redact_console(str(exc).strip()) or type(exc).__name__
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    cut = lines[:limit]
    cut = [ln if len(ln) <= width else ln[: width - 3] + "..." for ln in cut]
    if len(lines) > limit:
        cut[-1] += " [...]"
    return "\n".join(cut)


def report_error(exc: BaseException, *, debug: bool) -> int:
    """Print ``exc`` for a person (traceback only with ``debug``); returns the exit code."""
    if debug:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        typer.echo(redact_console(text).rstrip(), err=True)
    user = isinstance(exc, user_error_types())
    message = short_message(exc)
    if not user:
        message = f"{type(exc).__name__}: {message}"
    hint = "" if debug else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
    if user:
        typer.echo(f"error: {message}", err=True)
        return USER_ERROR_EXIT
    typer.echo(f"error: {message}{hint}", err=True)
    return RUN_FAILED_EXIT


#: Exits and usage errors the command line reports itself (typer vendors its own click).
_PASS_THROUGH = (typer.Exit, typer.Abort, ClickException, KeyboardInterrupt)


@contextmanager
def handled(*, debug: bool = False, quiet: bool = True) -> Iterator[None]:
    """Run a command: safe output, and any exception turned into ``report`` and an exit code."""
    with native_stderr(quiet=quiet), safe_output(quiet=quiet):
        try:
            yield
        except (*_PASS_THROUGH, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place errors are reported
            code = report_error(exc, debug=debug_enabled(debug))
            raise typer.Exit(code) from None
