"""Fixtures of the end-to-end tests: a moto S3 server, a Ray head from ``ray start`` and an
``mlflow server``, each a process of its own on 127.0.0.1 with free ports.

The three are launched together (``services``, once per module) so that they start in
parallel, then each fixture waits for the one it gives; all are stopped when the module ends,
also when a test or a start-up fails. They are separate from the session's ``ray_cluster``
(``ray.init(address="local")`` in this process) and ``s3_endpoint`` (a moto thread in this
process), which the e2e tests do not use; this process's S3 environment is restored afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from e2e_support import (
    S3_TEST_ENV,
    RayHead,
    Service,
    launch_mlflow,
    launch_moto,
    launch_ray_head,
)
from mlflow_fixtures import MlflowServer


class Services(NamedTuple):
    s3: Service
    s3_endpoint: str
    ray: RayHead
    mlflow: Service
    mlflow_uri: str
    mlflow_root: Path


class S3Server(NamedTuple):
    endpoint: str
    env: dict[str, str]  # what a job needs to reach it: endpoint and test credentials


def _ready(service: Service) -> None:
    try:
        service.wait_ready()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def _clear_s3fs_cache() -> None:
    """Forget cached S3 filesystems: they keep the endpoint they were created with."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """Launch the three servers at once; stop every one that was launched, whatever happens."""
    root = tmp_path_factory.mktemp("services")
    (root / "mlflow").mkdir()
    started: list[Service] = []
    try:
        s3, endpoint = launch_moto(root / "moto.log")
        started.append(s3)
        head = launch_ray_head(root / "ray-start.log")
        started.append(head.service)
        mlflow, uri = launch_mlflow(root / "mlflow")
        started.append(mlflow)
        yield Services(s3, endpoint, head, mlflow, uri, root / "mlflow")
    finally:
        for service in reversed(started):
            service.stop()


@pytest.fixture(scope="module")
def e2e_s3(services: Services) -> Iterator[S3Server]:
    """The moto S3 server. This process talks to it too (to prepare inputs and read
    results): the AWS variables are set for the module and restored afterwards."""
    _ready(services.s3)
    env = {**S3_TEST_ENV, "AWS_ENDPOINT_URL": services.s3_endpoint}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    _clear_s3fs_cache()
    try:
        yield S3Server(services.s3_endpoint, env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_s3fs_cache()


@pytest.fixture(scope="module")
def ray_head(services: Services) -> RayHead:
    """The Ray head (2 CPUs, job API on a free port, token authentication on)."""
    _ready(services.ray.service)
    return services.ray


@pytest.fixture(scope="module")
def mlflow_server(services: Services) -> MlflowServer:
    """The ``mlflow server`` (SQLite backend, proxied artifacts under its root)."""
    _ready(services.mlflow)
    return MlflowServer(services.mlflow_uri, services.mlflow_root)
