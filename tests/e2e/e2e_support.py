"""Processes of the end-to-end tests: a Ray head started with ``ray start``, jobs submitted with
the ``ray job`` CLI, and their clean-up.

Everything runs on this machine, bound to free ports, in directories of its own. The Ray head
is stopped by process id, never with ``ray stop`` (which stops *every* Ray of the user on the
machine, including the test session's own cluster and other people's).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import proc_guard
import yaml
from mlflow_fixtures import mlflow_server_args

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's own bin directory
RAY = str(VENV_BIN / "ray")

START_TIMEOUT = 120.0  # two shared cores: generous, but bounded
JOB_TIMEOUT = 300.0
CLI_TIMEOUT = 60.0
STOP_GRACE = 5.0

# Test credentials of the moto server only; never real ones.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_DROPPED = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")
_DROPPED_PREFIXES = ("AWS_", "MLFLOW_")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray, AWS or MLflow settings; the venv first on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _DROPPED and not k.startswith(_DROPPED_PREFIXES)
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- process clean-up
# The /proc work (a process tree, the temp-dir marker, stopping) is tests/proc_guard.py's.


def stop_tree(proc: subprocess.Popen, marker: str | None = None) -> None:
    """Stop ``proc``, its descendants and every process naming ``marker`` (if given):
    SIGTERM, a short grace, then SIGKILL; reaps ``proc`` and drops its clean-up record.

    Ray job entrypoints run in sessions of their own, so killing the head's process group
    alone would miss them; their working directory lies under the head's temp dir (the
    marker)."""
    proc_guard.stop(proc, marker, grace=STOP_GRACE)


# ----------------------------------------------------------------------------- services


@dataclass
class Service:
    """A server process started in a session of its own; ready once ``ready_url`` answers 200.

    Services are launched first and waited for later, so that several start at once.
    """

    name: str
    proc: subprocess.Popen
    ready_url: str
    log: Path
    headers: dict[str, str] = field(default_factory=dict)
    marker: str | None = None  # also stop every process naming this (see stop_tree)
    scratch: Path | None = None  # removed when stopped

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll ``ready_url``; RuntimeError with the log if the process exits or times out."""
        deadline = time.monotonic() + timeout
        while not _http_ok(self.ready_url, self.headers):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not answer at {self.ready_url} within {timeout:.0f}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.3)

    def stop(self) -> None:
        stop_tree(self.proc, self.marker)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _http_ok(url: str, headers: dict[str, str]) -> bool:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def launch(name: str, args: list[str], log: Path, ready_url: str, env: dict[str, str], **kw):
    """Start ``args`` in a new session with its output in ``log``; returns the Service."""
    log.write_bytes(b"")
    proc = proc_guard.spawn(args, name=name, log=log, env=env, marker=kw.get("marker"))
    return Service(name, proc, ready_url, log, **kw)


def launch_moto(log: Path) -> tuple[Service, str]:
    """moto's standalone S3 server on a free loopback port; returns it and its endpoint."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return launch("moto server", args, log, f"{endpoint}/moto-api/", base_env()), endpoint


def launch_mlflow(root: Path) -> tuple[Service, str]:
    """``mlflow server`` (SQLite backend, proxied local artifacts) on a free loopback port."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    args = mlflow_server_args(root, port)
    return launch("mlflow server", args, root / "server.log", f"{uri}/health", base_env()), uri


@dataclass
class RayHead:
    """A Ray head started with ``ray start --head --block``; its job API and token."""

    service: Service
    address: str  # the job API (dashboard) URL
    token: str
    gcs_address: str = ""  # host:port worker nodes join (ray start --address)

    def cli_env(self, **extra: str) -> dict[str, str]:
        """Environment for ``ray job ...``: token authentication with this head's token."""
        return base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, **extra)

    def stop(self) -> None:
        """Stop the head, its workers and its jobs' drivers; remove its temp dir."""
        self.service.stop()


def launch_ray_head(log: Path, *, object_store_mb: int = 150, num_cpus: int = 2) -> RayHead:
    """Launch a Ray head (2 CPUs unless told) with the dashboard (job API) on a free port.

    Token authentication stays on, with a token made for this head (``RAY_AUTH_TOKEN``), so
    ``~/.ray/auth_token`` is neither read nor written. Every port is a free one and the temp
    dir is a new, short one (Ray's Unix socket paths live under it), so this head shares
    nothing with other Ray instances on the machine. Ready when the job API answers.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="qre-", dir="/tmp"))
    token = secrets.token_hex(32)
    dashboard_port = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    args = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    address = f"http://127.0.0.1:{dashboard_port}"
    service = launch(
        "ray start --head",
        args,
        log,
        f"{address}/api/jobs/",
        base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
        headers={"Authorization": f"Bearer {token}"},
        marker=f"{temp_dir}/",
        scratch=temp_dir,
    )
    return RayHead(service, address, token, gcs_address=f"127.0.0.1:{ports['--port']}")


def launch_ray_worker(
    head: RayHead, log: Path, *, num_cpus: int, resources: dict[str, float], object_store_mb=100
) -> Service:
    """Launch a worker node joining ``head`` (``ray start --address --block``) with its own
    temp dir and ports and the given custom ``resources``. Ready once it has started (the
    caller waits for the node to register with the head, see ``alive_nodes``)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="qrw-", dir="/tmp"))
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    args = [
        RAY,
        "start",
        "--block",
        f"--address={head.gcs_address}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--resources={json.dumps(resources)}",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    return launch(
        "ray start --address",
        args,
        log,
        f"{head.address}/api/jobs/",
        base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token),
        headers={"Authorization": f"Bearer {head.token}"},
        marker=f"{temp_dir}/",
        scratch=temp_dir,
    )


def kill_node(service: Service) -> None:
    """SIGKILL a node at once (its raylet, its workers): a machine that is lost."""
    proc_guard.kill_tree(service.proc.pid, service.marker)
    with contextlib.suppress(subprocess.TimeoutExpired):
        service.proc.wait(timeout=10)


def alive_nodes(head: RayHead) -> list[dict]:
    """The cluster's live nodes as ``ray list nodes`` reports them (id, head?, resources)."""
    result = subprocess.run(
        [RAY, "list", "nodes", "--address", head.address, "--format", "json", "--detail"],
        cwd=REPO,
        env=head.cli_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    # while the head starts: "Failed to connect to API server", "No resource in the cluster";
    # callers wait for the nodes they expect within a deadline
    if result.returncode != 0 or not result.stdout.lstrip().startswith("["):
        return []
    return [n for n in json.loads(result.stdout) if n.get("state") == "ALIVE"]


# ----------------------------------------------------------------------------- jobs


@dataclass
class JobRun:
    """One ``ray job submit`` (streaming its logs) and the job's final state."""

    submission_id: str
    returncode: int
    output: str  # what `ray job submit` printed (the job's logs included)
    status: str
    logs: str  # the job's logs (driver output)
    seconds: float  # wall time of `ray job submit`

    def describe(self, chars: int = 6000) -> str:
        """The job's id, status and the end of its logs, for assertion messages."""
        return (
            f"job {self.submission_id}: status {self.status} after {self.seconds:.0f}s, "
            f"`ray job submit` exit code {self.returncode}; end of its output:\n"
            f"{self.output[-chars:]}"
        )


def runtime_env_file(path: Path, env_vars: dict[str, str]) -> Path:
    """``jobs/runtime_env.yaml`` (the file users submit with) plus test ``env_vars``."""
    spec = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    spec["env_vars"] = {**spec.get("env_vars", {}), **env_vars}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def ray_cli(head: RayHead, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``ray job <args>`` against ``head`` from the repository root."""
    return subprocess.run(
        [RAY, "job", *args],
        cwd=REPO,
        env=head.cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def job_status(head: RayHead, submission_id: str) -> str:
    """The job's status word (SUCCEEDED, FAILED, ...) as the REST job API reports it."""
    return str(_get_json(head, f"/api/jobs/{submission_id}")["status"])


def _get_json(head: RayHead, path: str) -> dict:
    request = urllib.request.Request(
        f"{head.address}{path}", headers={"Authorization": f"Bearer {head.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def job_logs(head: RayHead, submission_id: str) -> str:
    """The job's logs as the REST job API serves them (what `ray job logs` prints)."""
    return str(_get_json(head, f"/api/jobs/{submission_id}/logs")["logs"])


def cli_job_logs(head: RayHead, submission_id: str) -> str:
    """``ray job logs <id>``: what a user reads."""
    result = ray_cli(head, "logs", "--address", head.address, submission_id)
    return _strip_ansi(result.stdout + result.stderr)


def run_on_cluster(
    head: RayHead,
    entrypoint: list[str],
    runtime_env: Path,
    *,
    name: str,
    timeout: float = JOB_TIMEOUT,
) -> JobRun:
    """``ray job submit --working-dir <repo> --runtime-env <file> -- <entrypoint>``, waited for.

    The submission id is ``<name>-<random>``. On timeout the job is stopped and a
    RuntimeError carries its logs, so that a hung job fails the test within the bound.
    """
    submission_id = f"{name}-{secrets.token_hex(4)}"
    args = [
        "submit",
        "--address",
        head.address,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--runtime-env",
        str(runtime_env),
        "--log-style",
        "record",
        "--",
        *entrypoint,
    ]
    start = time.monotonic()
    try:
        result = ray_cli(head, *args, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        logs = "(not available)"
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            ray_cli(head, "stop", "--address", head.address, submission_id)
            logs = job_logs(head, submission_id)[-6000:]
        raise RuntimeError(
            f"job {submission_id} did not finish within {timeout:.0f}s; its logs:\n{logs}"
        ) from exc
    output = _strip_ansi(result.stdout + result.stderr)
    return JobRun(
        submission_id=submission_id,
        returncode=result.returncode,
        output=output,
        status=job_status(head, submission_id),
        logs=_strip_ansi(job_logs(head, submission_id)),
        seconds=time.monotonic() - start,
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)
