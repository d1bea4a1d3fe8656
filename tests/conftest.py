"""Session fixtures: one real local Ray cluster and one real S3-compatible server per session.

The moto server runs in this process on 127.0.0.1; Ray's workers are separate processes and
reach it over HTTP through the standard AWS environment variables, which are set before Ray
starts so that every worker inherits them.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from shared_gate import SHARED, SHARED_DATA, SHARED_SKIP, need_shared  # noqa: F401

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pytest_configure(config: pytest.Config) -> None:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("MPLBACKEND", "Agg")


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Clean up after earlier runs of this checkout and guard this one (tests/proc_guard.py).

    Servers started by tests run in sessions of their own; a watchdog stops them if this
    pytest process dies, and SIGTERM (a timeout) becomes an interrupt so that fixture
    teardown runs.
    """
    if os.environ.get("MUTANT_UNDER_TEST"):
        return  # a forked `make mutants` worker: server-free tests only, one per mutant
    import proc_guard

    for line in proc_guard.reap():
        print(f"stopped a leftover of an earlier test run: {line}")
    session.config._qmag_watchdog = proc_guard.start_watchdog()  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` for tests that read it; see :func:`need_shared`."""
    return need_shared()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    count = sum(1 for r in skipped if SHARED_SKIP in str(r.longrepr))
    if count:
        terminalreporter.write_line(
            f"{count} test(s) skipped: shared test data missing at {SHARED_DATA} "
            "(they run where ../shared exists; CI=true makes them fail)",
            yellow=True,
        )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto's standalone server) on a free loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket for one test; returns ``s3://<bucket>``."""
    import fsspec

    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    """The session's one local Ray cluster (2 CPUs, no dashboard, a small object store).

    Workers get the S3 endpoint and test credentials through the runtime environment.
    """
    import ray

    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint, "RAY_USAGE_STATS_ENABLED": "0"}
    ray.init(
        address="local",  # never attach to a cluster an end-to-end test started with `ray start`
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        runtime_env={"env_vars": env},
        logging_level="WARNING",
    )
    try:
        yield None
    finally:
        ray.shutdown()
