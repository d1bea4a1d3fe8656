"""MLflow fixtures: a SQLite store per test and a real ``mlflow server`` subprocess per module.

Test files import what they need (``from mlflow_fixtures import ...``); calibrations are built
directly (alpha, beta, thresholds), independent of the fitting code.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import proc_guard
import pytest

from qmag_ray.calibration.result import QMagFaceCalibration

VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's own bin directory
START_TIMEOUT = 120.0  # generous: two cores shared with other work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test environment with the venv's bin first on PATH (gunicorn/uvicorn, mlflow)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def make_calibration(
    alpha: float = 0.077428,
    beta: float = 0.125926,
    *,
    thresholds: dict[str, float] | None = None,
    embedding_dim: int | None = None,
    fingerprint: str = "test-fingerprint",
    extra: dict[str, object] | None = None,
) -> QMagFaceCalibration:
    """A calibration with the given parameters and operating thresholds (QMagFace scores)."""
    info: dict[str, object] = dict(extra or {})
    if embedding_dim is not None:
        info["embedding_dim"] = embedding_dim
    return QMagFaceCalibration(
        alpha=alpha,
        beta=beta,
        n_genuine=300,
        n_impostor=45_000,
        fingerprint=fingerprint,
        fmrs=[1e-4, 1e-3, 1e-2],
        optimal_weights=[-0.01, -0.005, 0.0],
        optimal_thresholds=[0.62, 0.58, 0.55],
        weights=[-0.01, 0.0],
        fnmr_table=[[0.2, 0.1, 0.05], [0.25, 0.12, 0.04]],
        thresholds={"1e-04": 0.45, "1e-03": 0.30, "1e-02": 0.20}
        if thresholds is None
        else thresholds,
        extra=info,
    )


def random_pairs(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised embedding pairs with varied norms (qualities) and similarities."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, dim))
    b = 0.6 * a + rng.normal(size=(n, dim)) * rng.uniform(0.2, 2.0, size=(n, 1))
    a *= rng.uniform(5, 35, size=(n, 1)) / np.linalg.norm(a, axis=1, keepdims=True)
    b *= rng.uniform(5, 35, size=(n, 1)) / np.linalg.norm(b, axis=1, keepdims=True)
    return a, b


@contextmanager
def tracking_at(uri: str) -> Iterator[str]:
    """Point MLflow at ``uri`` for a block, then back at its defaults."""
    import mlflow

    from qmag_ray.tracking.uri import configure_tracking

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    configure_tracking(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture()
def sqlite_tracking(tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite tracking store in ``tmp_path``, configured as MLflow's tracking URI."""
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}") as uri:
        yield uri


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the process log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started by :func:`running`, and its children (workers)."""
    proc_guard.stop(proc)


@contextmanager
def running(args: list[str], log: Path, url: str, env: dict[str, str]) -> Iterator[None]:
    """Run ``args`` in a new session with output to ``log``; ready once ``url`` answers.

    The process is registered with :mod:`proc_guard`, so it is stopped even when the test run
    itself is killed.
    """
    log.write_bytes(b"")
    proc = proc_guard.spawn(args, name=Path(args[0]).name, log=log, env=env)
    try:
        wait_for_http(url, proc, log, START_TIMEOUT)
        yield
    finally:
        stop(proc)


class MlflowServer(NamedTuple):
    uri: str
    root: Path  # holds mlflow.db and artifacts/


def mlflow_server_args(root: Path, port: int) -> list[str]:
    """``mlflow server`` on 127.0.0.1:``port``: SQLite under ``root``, proxied local artifacts."""
    return [
        str(VENV_BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` on 127.0.0.1: SQLite backend, proxied local artifact root."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    args = mlflow_server_args(root, port)
    uri = f"http://127.0.0.1:{port}"
    env = subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job workers needed
    with running(args, root / "server.log", f"{uri}/health", env):
        yield MlflowServer(uri, root)
