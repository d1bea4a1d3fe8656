"""Fixtures of the end-to-end tests: a moto S3 server process and a Ray head from ``ray start``.

Both are module-scoped and stopped when the module ends, also when a test fails. They are
separate from the session's ``ray_cluster`` (``ray.init(address="local")`` in this process) and
``s3_endpoint`` (a moto server thread in this process): the e2e tests use neither, and restore
the S3 environment of this process when they are done.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from e2e_support import (
    S3_TEST_ENV,
    RayHead,
    base_env,
    free_port,
    start_ray_head,
    stop_ray_head,
    stop_tree,
)

S3_START_TIMEOUT = 60.0


class S3Server(NamedTuple):
    endpoint: str
    env: dict[str, str]  # what a job needs to reach it: endpoint and test credentials


def _clear_s3fs_cache() -> None:
    """Forget cached S3 filesystems: they keep the endpoint they were created with."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def _wait_for_s3(url: str, proc: subprocess.Popen, log: Path) -> None:
    import time

    deadline = time.monotonic() + S3_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"moto server at {url} did not answer within {S3_START_TIMEOUT:.0f}s")


@pytest.fixture(scope="module")
def e2e_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server as a process of its own on a free loopback port.

    This process talks to it too (to prepare inputs and read results): the AWS variables are
    set for the module and restored afterwards.
    """
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=base_env(), start_new_session=True
        )
    env = {**S3_TEST_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN"]}
    try:
        _wait_for_s3(f"{endpoint}/moto-api/", proc, log)
        os.environ.update(env)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        _clear_s3fs_cache()
        yield S3Server(endpoint, env)
    finally:
        stop_tree(proc)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_s3fs_cache()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A Ray head (2 CPUs, job API on a free port, token authentication on), then stopped."""
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    try:
        head = start_ray_head(log)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield head
    finally:
        stop_ray_head(head)
