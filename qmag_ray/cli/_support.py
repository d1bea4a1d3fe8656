"""Entry-point duties shared by the `qmag-ray` commands (calibrate, evaluate, identify, ...).

Only entry points read the environment, resolve and check the tracking store, connect Ray and
record runs: the order is config -> input checks -> tracking reachable -> Ray -> workflow ->
MLflow, so that a bad input or an unreachable tracking server fails before any computation.
User errors end with exit code 2 and a one-paragraph message, never a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer

from qmag_ray import storage

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Exit code of a user error (bad option, config, input): the message says what to fix.
USER_ERROR_EXIT = 2
#: Exit code of a run that started and failed.
RUN_FAILED_EXIT = 1


def fail(message: str, code: int = USER_ERROR_EXIT) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def _user_errors() -> tuple[type[BaseException], ...]:
    from qmag_ray.tracking.uri import TrackingUnreachableError

    # ConfigError, EmbeddingsError, PairFileError, ResolveError, WorkflowError and the
    # calibration's ill-posed-data errors are ValueErrors.
    return (ValueError, FileNotFoundError, PermissionError, TrackingUnreachableError)


def guarded(what: str, fn: Callable[[], T]) -> T:
    """``fn()``; a user error it raises becomes ``fail`` (exit code 2, no traceback)."""
    try:
        return fn()
    except _user_errors() as exc:
        logger.debug("%s failed", what, exc_info=True)
        text = str(exc).strip() or type(exc).__name__
        fail(f"{what}: {text}")
    except OSError as exc:  # a full disk, a read-only or vanished output: a failed run
        if getattr(exc, "errno", None) not in _STORAGE_ERRNOS:
            raise
        logger.debug("%s failed", what, exc_info=True)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        fail(f"{what}: writing{where} failed: {describe_os_error(exc)}", code=1)


def load(cls: type[T], config: str | None, given: Mapping[str, Any]) -> T:
    """The config (file, then command-line values that are not None) or exit 2."""
    from qmag_ray.config import load_config

    overrides = {k: v for k, v in given.items() if v is not None}
    return guarded("configuration", lambda: load_config(cls, config, overrides))


def require_exists(**uris: str | None) -> None:
    """Each given URI must exist and be readable (checked before Ray starts: credentials,
    bucket, an embeddings folder holding embeddings); exit 2 naming the flag and the fix.

    Keyword names are the options' (``validation_pairs`` is ``--validation-pairs``).
    """
    from qmag_ray.cli import preflight

    for name, uri in uris.items():
        if not uri:
            continue
        try:
            if name.endswith("embeddings"):
                preflight.check_embeddings(name, uri)
            else:
                preflight.check_uri(name, uri)
        except preflight.PreflightError as exc:
            fail(str(exc))


def require_writable(**uris: str | None) -> None:
    """An output on an object store has credentials and an existing bucket (before Ray)."""
    from qmag_ray.cli import preflight

    for name, uri in uris.items():
        if not uri or storage.protocol(uri) not in preflight.OBJECT_STORES:
            continue
        bucket = uri.split("://", 1)[0] + "://" + uri.split("://", 1)[1].split("/", 1)[0]
        try:
            preflight.check_uri(name, bucket)
        except preflight.PreflightError as exc:
            text = str(exc)
            if " not found: " in text:
                fail(f"--{name}: the bucket of {storage.redact(uri)} does not exist")
            fail(text.replace(storage.redact(bucket), storage.redact(uri), 1))


def require_pairs(name: str, uri: str | None, protocol: Any = None) -> None:
    """The pair list parses as ``protocol`` (syntax, columns, labels), before Ray starts."""
    from qmag_ray.cli import preflight

    if not uri:
        return
    try:
        preflight.check_pairs(name, uri, protocol)
    except preflight.PreflightError as exc:
        fail(str(exc))


def prepare_tracking(flag_or_config: str | None) -> str:
    """Resolve (flag/config > MLFLOW_TRACKING_URI > sqlite:///mlflow.db), check, configure."""
    from qmag_ray.tracking.uri import (
        HTTP_CLIENT_ENV,
        check_tracking_reachable,
        configure_tracking,
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(flag_or_config, os.environ)
    for key, value in HTTP_CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    guarded("tracking", lambda: check_tracking_reachable(uri))
    configure_tracking(uri)
    typer.echo(f"tracking: MLflow at {storage.redact(uri)}")
    return uri


def connect(ray_address: str | None) -> str:
    """Connect Ray (``--ray-address``, else RAY_ADDRESS, else a local cluster). The one line
    saying so is ``connect_ray``'s log line (``HH:MM:SS connected to Ray at ADDRESS``)."""
    from qmag_ray.runtime import connect_ray

    return guarded("Ray", lambda: connect_ray(ray_address))


def log_files(run: Any, files: Mapping[str, str], skip: tuple[str, ...] = ()) -> None:
    """Log result files as artifacts: JSON through the sanitiser, others as bytes."""
    for name, uri in files.items():
        if name in skip:
            continue
        if name.endswith(".json"):
            run.log_json(name, json.loads(storage.read_bytes(uri)))
        else:
            run.log_bytes(name, storage.read_bytes(uri))


def record_outcome(
    kind: str, outcome: Any, cfg: Any, address: str, tracking_uri: str, tags: Mapping[str, str]
) -> None:
    """One MLflow run of ``kind`` for a finished workflow: its settings (``outcome.params``),
    metrics (``outcome.tracking_metrics()``) and result files (``outcome.files``), in
    ``cfg.tracking.experiment``; a recording failure says the results are safe and exits 1."""
    from qmag_ray.tracking.runs import tracked_run

    with (
        tracking_errors(tracking_uri, cfg.output),
        tracked_run(
            kind=kind, experiment=cfg.tracking.experiment, ray_address=address, tags=dict(tags)
        ) as run,
    ):
        run.log_params(outcome.params)
        run.log_metrics(outcome.tracking_metrics())
        log_files(run, outcome.files)
        typer.echo(f"mlflow: run {run.run_id} in experiment {cfg.tracking.experiment!r}")


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM)
MIN_FREE_BYTES = 16 * 2**20  # a calibration's files and plots take a few MB


def take_output_lease(uri: str, purpose: str) -> Any:
    """The output's lease (one writer per output), held until the command ends; exit 2 if
    another writer holds it. Returns the ``lease.Lease`` (None where the store has none).

    Taking it also proves the output writable before any work: a read-only folder, a missing
    bucket or a full disk end here with one line naming the output.
    """
    import atexit

    from qmag_ray import lease

    if not lease.supported(uri):
        logger.warning("no lease on %s outputs: a second writer is not detected", uri)
        return None
    try:
        held = lease.acquire(uri, purpose=purpose)
    except lease.LeaseHeldError as exc:
        fail(f"output: {exc}")
    except (OSError, ValueError) as exc:
        logger.debug("taking the output lease failed", exc_info=True)
        fail(f"output {storage.redact(uri)} cannot be written: {describe_os_error(exc)}")
    # Released when the command ends (also under typer's CliRunner), at the latest at exit.
    ctx = _command_context()
    if ctx is not None:
        ctx.call_on_close(held.release)
    atexit.register(held.release)
    _check_free_space(uri)
    return held


def _check_free_space(uri: str) -> None:
    """A local output with almost no free space is refused before any work."""
    import shutil

    if storage.protocol(uri) != "file":
        return
    free = shutil.disk_usage(storage.absolute(uri)).free
    if free < MIN_FREE_BYTES:
        fail(
            f"output {storage.redact(uri)}: only {free / 2**20:.1f} MiB free on its file system "
            f"(at least {MIN_FREE_BYTES // 2**20} MiB needed); free some space and run again",
            code=1,
        )


def _command_context() -> Any:
    """The running command's context (typer ships its own copy of click), or None."""
    import importlib

    for name in ("typer._click.globals", "click"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        ctx = module.get_current_context(silent=True)
        if ctx is not None:
            return ctx
    return None


def still_held(held: Any) -> None:
    """Exit 1 before committing if the output's lease was taken over meanwhile."""
    from qmag_ray import lease

    try:
        if held is not None:
            held.fence()  # asks the store: a holder that stalled and was taken over is refused
    except lease.LeaseLostError as exc:
        fail(f"output: {exc}", code=1)


def describe_os_error(exc: BaseException) -> str:
    """One line for a storage error: what failed and the usual fix (no traceback)."""
    code = getattr(exc, "errno", None)
    hints = {
        errno.ENOSPC: "no space left on the device; free some space and run the same command again",
        errno.EROFS: "the file system is read-only; choose a writable --output",
        errno.EACCES: "permission denied; choose an --output you may write to",
        errno.EDQUOT: "disk quota exceeded; free some space and run the same command again",
    }
    if code in hints:
        return hints[code]
    text = str(exc).strip() or type(exc).__name__
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"the bucket does not exist ({text}); create it or fix the URI"
    return text


@contextmanager
def tracking_errors(tracking_uri: str, output: str) -> Iterator[None]:
    """Recording failures after the computation: say the results are safe, exit 1."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported, the run's files are already written
        logger.debug("recording failed", exc_info=True)
        fail(
            f"the results were written to {storage.redact(output)}, but recording the run in "
            f"MLflow at {storage.redact(tracking_uri)} failed: {exc}",
            code=RUN_FAILED_EXIT,
        )
