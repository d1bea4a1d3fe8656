"""MLflow faults leave a clean state (issue 12: killing MLflow during a calibration left the run
RUNNING forever, or a READY model version without its tags).

A real ``mlflow server`` (SQLite, proxied artifacts) is killed with SIGKILL while a real driver
process is inside a run, then restarted on the same store and port. Expected by hand: the
driver says it could not end the run and exits non-zero; the next run on this host marks the
orphan FAILED; a version registered afterwards carries every tag (it is created with them in
one request), and no version without them exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import proc_guard
import pytest
from mlflow_fixtures import (
    free_port,
    make_calibration,
    mlflow_server_args,
    subprocess_env,
    tracking_at,
    wait_for_http,
)

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

DRIVER = r"""
import os, sys, time
import mlflow
from qmag_ray.tracking.uri import configure_tracking
from qmag_ray.tracking.runs import tracked_run
os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
configure_tracking(sys.argv[1])
go = sys.argv[2]
with tracked_run(kind="calibrate", run_name="doomed") as run:
    print(run.run_id, flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
    run.log_metrics({"alpha": 0.1})  # the server is gone: this raises
"""


def start_server(root: Path, port: int) -> subprocess.Popen:
    env = subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = root / f"server-{time.monotonic_ns()}.log"
    proc = proc_guard.spawn(mlflow_server_args(root, port), name="mlflow", log=log, env=env)
    wait_for_http(f"http://127.0.0.1:{port}/health", proc, log, 120)
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the whole server, at once
    proc.wait(timeout=30)
    proc_guard.unregister(proc.pid)


def test_killed_server_mid_run_leaves_no_run_running_and_no_half_tagged_version(
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    root = tmp_path / "store"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    go = tmp_path / "go"
    env = {**subprocess_env(), "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, uri, str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        run_id = driver.stdout.readline().strip()
        assert len(run_id) == 32, driver.stderr.read()
        kill(server)  # mid-run
        go.touch()
        _, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
        if server.poll() is None:
            kill(server)
    assert driver.returncode != 0
    assert f"could not mark MLflow run {run_id} FAILED" in err
    assert "the next qmag-ray run on this host marks it FAILED" in err

    server = start_server(root, port)  # same store, same address
    try:
        client = MlflowClient(tracking_uri=uri)
        assert client.get_run(run_id).info.status == "RUNNING"  # what the outage left
        with tracking_at(uri):
            from qmag_ray.tracking.registry import TAG_COMPLETE, register_scorer
            from qmag_ray.tracking.runs import tracked_run

            with tracked_run(kind="calibrate", run_name="next") as run:
                version = register_scorer(make_calibration(), model_name="qmagface-fault")
                next_id = run.run_id
        orphan = client.get_run(run_id)
        assert orphan.info.status == "FAILED"
        assert orphan.data.tags["qmag_ray.ended_by"] == "orphan cleanup (driver gone)"
        assert client.get_run(next_id).info.status == "FINISHED"
        versions = client.search_model_versions("name = 'qmagface-fault'")
        assert [v.version for v in versions] == [version.version]
        tags = versions[0].tags
        assert tags[TAG_COMPLETE] == "true" and {"alpha", "beta", "thresholds"} <= set(tags)
    finally:
        kill(server)
