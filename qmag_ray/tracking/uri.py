"""Where runs and models are recorded: resolving, checking and configuring the tracking URI.

Precedence: the ``--tracking-uri`` flag > ``MLFLOW_TRACKING_URI`` > a local SQLite store
(``sqlite:///mlflow.db``, artifacts in ``mlruns/`` beside the database file). Entry points pass
the environment in; the library never reads it. ``check_tracking_reachable`` fails within
seconds, before any computation, with a message naming the (redacted) URI.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from qmag_ray import storage

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ENV_VAR = "MLFLOW_TRACKING_URI"
#: Environment an entry point sets (``setdefault``) so MLflow's HTTP client gives up quickly
#: instead of retrying for minutes when the server goes away mid-run.
HTTP_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


class TrackingUnreachableError(RuntimeError):
    """The tracking store or server cannot be used; the message names the redacted URI."""


def resolve_tracking_uri(cli_value: str | None, env: Mapping[str, str]) -> str:
    """The tracking URI to use: flag, else ``MLFLOW_TRACKING_URI`` in ``env``, else SQLite."""
    for value in (cli_value, env.get(ENV_VAR)):
        if value and value.strip():
            return value.strip()
    return DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory or absolute)."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:") :]
    if not rest.startswith("///"):
        raise TrackingUnreachableError(
            f"tracking URI {storage.redact(uri)} is not of the form sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    path = rest[3:].split("?", 1)[0]
    if not path or path == ":memory:":
        raise TrackingUnreachableError(
            f"tracking URI {storage.redact(uri)} names no database file; an in-memory store "
            "cannot be shared by runs, models and services"
        )
    return Path(path)


def default_artifact_location(uri: str) -> str | None:
    """For a SQLite store, ``mlruns/`` beside the database file; ``None`` otherwise.

    MLflow's own default is ``./mlruns`` relative to the working directory, which scatters
    artifacts wherever a job happens to be started; this keeps them with the database.
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.absolute().parent / "mlruns").as_uri()


def check_tracking_reachable(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast (within about ``timeout`` seconds) when ``uri`` cannot be recorded to.

    HTTP(S) servers must answer ``GET /health``; SQLite databases must lie in an existing,
    writable directory; other database servers must accept a TCP connection. Raises
    ``TrackingUnreachableError`` naming the URI with any credentials removed.
    """
    shown = storage.redact(uri)
    db = sqlite_path(uri)
    if db is not None:
        parent = db.absolute().parent
        if not parent.is_dir():
            raise TrackingUnreachableError(
                f"MLflow tracking store {shown}: directory {parent} does not exist"
            )
        if db.exists() and not db.is_file():
            raise TrackingUnreachableError(f"MLflow tracking store {shown}: {db} is not a file")
        return
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("", "file"):
        path = Path(urlsplit(uri).path if scheme else uri)
        if not path.absolute().parent.is_dir():
            raise TrackingUnreachableError(
                f"MLflow tracking store {shown}: directory {path.absolute().parent} does not exist"
            )
        return
    if scheme in ("http", "https"):
        _check_http(uri, shown, timeout)
        return
    base = scheme.split("+", 1)[0]
    if base in _DEFAULT_PORTS:
        _check_tcp(uri, shown, timeout, _DEFAULT_PORTS[base])
    # Other schemes (databricks, custom plugins) have no generic probe; MLflow reports them.


def _host_port(uri: str, shown: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(uri)
    if not parts.hostname:
        raise TrackingUnreachableError(f"MLflow tracking URI {shown} names no host")
    try:
        port = parts.port or default_port
    except ValueError:
        raise TrackingUnreachableError(f"MLflow tracking URI {shown} has an invalid port") from None
    return parts.hostname, port


def _check_tcp(uri: str, shown: str, timeout: float, default_port: int) -> None:
    host, port = _host_port(uri, shown, default_port)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise TrackingUnreachableError(
            f"MLflow tracking store {shown} is not reachable ({host}:{port}): {exc}"
        ) from None


def _check_http(uri: str, shown: str, timeout: float) -> None:
    parts = urlsplit(uri)
    host, port = _host_port(uri, shown, _DEFAULT_PORTS[parts.scheme.lower()])
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    health = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnreachableError(
            f"MLflow tracking server {shown} is not reachable: {reason}"
        ) from None
    if status >= 500 or status == 404:
        raise TrackingUnreachableError(
            f"MLflow tracking server {shown} answered GET /health with HTTP {status}; "
            "is this an MLflow server?"
        )


def configure_tracking(uri: str) -> str:
    """Point MLflow's tracking and registry at ``uri``; for entry points and test fixtures.

    Library functions then use MLflow's configured client. Returns ``uri``.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri
