"""What a command prints by default (short) and with ``--verbose`` (everything).

Default: ``HH:MM:SS message`` lines from qmag_ray at INFO (one per stage, progress at a steady
pace, a summary), warnings and errors from everything else; MLflow's and Ray Data's own INFO
lines and Ray Data's progress blocks are left out. ``--verbose``: DEBUG from every logger in
the full format, and Ray Data's progress.
"""

from __future__ import annotations

import logging
import sys

_MARK = "_qmag_ray_console"
#: Loggers whose INFO lines are plumbing a user does not need (shown with --verbose).
CHATTY = ("mlflow", "ray.data", "alembic", "urllib3", "botocore", "s3fs", "fsspec")

_state = {"verbose": False}


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is now (the redacting stream of errors)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401 - the current stderr
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _Short(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            head, _, tail = text.partition(" ")
            return f"{head} {record.levelname.lower()}: {tail}"
        return text


def verbose() -> bool:
    """Whether ``--verbose`` was given to this command."""
    return _state["verbose"]


def configure_logging(verbose_: bool) -> None:
    """Levels and format for one command (see the module docstring)."""
    _state["verbose"] = verbose_
    root = logging.getLogger()
    if not root.handlers:  # an embedding application (or pytest) keeps its own handlers
        handler = _CurrentStderr()
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    for handler in root.handlers:
        if getattr(handler, _MARK, False):
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
                if verbose_
                else _Short("%(asctime)s %(message)s", datefmt="%H:%M:%S")
            )
    root.setLevel(logging.DEBUG if verbose_ else logging.WARNING)
    logging.getLogger("qmag_ray").setLevel(logging.DEBUG if verbose_ else logging.INFO)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose_ else logging.WARNING)


def quiet_ray_data() -> None:
    """Ray Data's progress blocks and INFO lines only with ``--verbose`` (after ray.init)."""
    if verbose():
        return
    try:
        from ray.data import DataContext
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        return
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
