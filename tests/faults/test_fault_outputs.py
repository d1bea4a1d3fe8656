"""Outputs under fault: a second writer, a read-only or full file system, a missing bucket.

Every case runs the real ``qmag-ray`` command as a process and asserts the one message the user
sees, the exit code, and that nothing was written (or that what was written is kept). The
holder of a lease is a real, separate process. Full and read-only file systems are real tmpfs
mounts where this machine allows mounting (root), else read-only is a chmod and full is skipped
in favour of the free-space refusal, which is tested on the same path with a tiny mount.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from workflow_data import synthetic_table, write_table

from qmag_ray import lease

ROOT = Path(__file__).resolve().parents[2]
HOLDER = r"""
import sys, time
from qmag_ray import lease
lease.acquire(sys.argv[1], purpose=sys.argv[2], ttl_s=3600)
print("held", flush=True)
time.sleep(600)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def qmag(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "qmag-ray"
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600
    )


@contextmanager
def holder(uri: str, purpose: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, purpose], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture()
def embeddings(tmp_path: Path) -> str:
    return write_table(synthetic_table(40, 4, dim=16), tmp_path / "emb")


def calibrate(tmp_path: Path, embeddings: str, output: str, **env: str):
    return qmag(
        "calibrate",
        "--embeddings",
        embeddings,
        "--output",
        output,
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        cwd=tmp_path,
        **env,
    )


def test_second_calibrate_on_one_output_is_refused_naming_the_holder(
    tmp_path: Path, embeddings: str
) -> None:
    out = tmp_path / "cal"
    with holder(str(out), "calibrate") as proc:
        done = calibrate(tmp_path, embeddings, str(out))
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert err[-1].startswith("error: output: another writer holds"), done.stderr
    assert f"pid {proc.pid}" in err[-1] and "calibrate by" in err[-1]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [lease.LEASE_NAME, lease.LEASE_NAME + ".lock"]


def test_overlapping_recalibration_stops_before_touching_the_shared_embeddings(
    tmp_path: Path,
) -> None:
    # Issue 12: two overlapping recalibrations of one config both wrote the shared embeddings.
    import yaml

    (tmp_path / "images" / "p0").mkdir(parents=True)
    write_table(synthetic_table(10, 2, dim=16), tmp_path / "holdout")
    rows = [f"p{i}/a.jpg,p{i}/b.jpg,1" for i in range(5)]
    rows += [f"p{i}/a.jpg,p{i + 1}/b.jpg,0" for i in range(20)]
    (tmp_path / "holdout.csv").write_text("a,b,label\n" + "\n".join(rows) + "\n")
    config = {
        "images": str(tmp_path / "images"),
        "embeddings": str(tmp_path / "shared-embeddings"),
        "model": str(ROOT / "qmag_ray" / "assets" / "demo_iresnet.pth"),
        "arch": "iresnet-demo",
        "output": str(tmp_path / "runs"),
        "holdout": {
            "embeddings": str(tmp_path / "holdout"),
            "pairs": str(tmp_path / "holdout.csv"),
        },
        "gate": {"target_fmr": 0.1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "recal.yaml").write_text(yaml.safe_dump(config))
    with holder(str(tmp_path / "runs"), "recalibrate") as proc:
        done = qmag("recalibrate", "--config", str(tmp_path / "recal.yaml"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "another writer holds" in done.stderr and f"pid {proc.pid}" in done.stderr
    assert "recalibrate by" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "shared-embeddings").exists()  # nothing embedded, nothing written


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


@contextmanager
def mounted(path: Path, options: str) -> Iterator[bool]:
    ok = _mount_tmpfs(path, options)
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", str(path)], check=False)


def test_read_only_output_is_one_message_before_any_work(tmp_path: Path, embeddings: str) -> None:
    target = tmp_path / "ro"
    with mounted(target, "ro,size=1m") as ok:
        if not ok:
            target.chmod(0o555)
        done = calibrate(tmp_path, embeddings, str(target / "cal"))
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: output {target / 'cal'} cannot be written:"), done.stderr
    assert ("read-only" in line) if ok else ("permission denied" in line)
    assert "Traceback" not in done.stderr and "connected to Ray" not in done.stderr + done.stdout


def test_full_disk_is_refused_before_any_work(tmp_path: Path, embeddings: str) -> None:
    target = tmp_path / "full"
    with mounted(target, "size=1m") as ok:
        if not ok:
            pytest.fail("mounting a tmpfs needs root; run the fault suite as root (CI does)")
        done = calibrate(tmp_path, embeddings, str(target / "cal"))
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "MiB free on its file system" in line and "free some space and run again" in line
    assert "Traceback" not in done.stderr and "connected to Ray" not in done.stderr + done.stdout


@pytest.mark.s3
def test_missing_bucket_is_one_message_before_any_work(
    tmp_path: Path, embeddings: str, s3_endpoint: str
) -> None:
    done = calibrate(
        tmp_path,
        embeddings,
        "s3://no-such-bucket-qmag/cal/",
        AWS_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: output s3://no-such-bucket-qmag/cal/ cannot be written:")
    assert "bucket does not exist" in line and "Traceback" not in done.stderr
    assert "testing" not in done.stderr  # no credential echoed


def test_bogus_3gb_checkpoint_is_refused_without_reading_it(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pth"
    with bogus.open("wb") as f:  # sparse: 3 GB long, no disk used
        f.write(b"\x00not a checkpoint")
        f.truncate(3 * 2**30)
    (tmp_path / "images" / "a").mkdir(parents=True)
    code = (
        "import resource, sys\n"
        "from qmag_ray.model.checkpoint import CheckpointError, read_checkpoint\n"
        "try:\n    read_checkpoint(sys.argv[1])\n"
        "except CheckpointError as exc:\n    print(exc)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(bogus)], capture_output=True, text=True, env=_env()
    )
    message, rss_kib = done.stdout.strip().splitlines()
    assert "is not a torch checkpoint" in message and "refused before reading it" in message
    assert int(rss_kib) < 1024 * 1024  # far below the 3 GB it would take to read it whole
    embed = qmag(
        "embed",
        "--images",
        str(tmp_path / "images"),
        "--model",
        str(bogus),
        "--arch",
        "iresnet-demo",
        "--output",
        str(tmp_path / "emb-out"),
        cwd=tmp_path,
    )
    assert embed.returncode == 2, embed.stderr  # a bogus checkpoint is a user error
    assert embed.stderr.strip().splitlines()[-1].startswith("error: checkpoint ")
    assert "is not a torch checkpoint" in embed.stderr and "Traceback" not in embed.stderr


def test_disk_filling_up_during_the_work_is_one_line(capsys: pytest.CaptureFixture) -> None:
    # Fault-injected: the write error a full disk raises part-way through a step.
    import errno

    import typer

    from qmag_ray.cli._support import guarded

    def step() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/out/cal/plots/det.png")

    with pytest.raises(typer.Exit) as exit_:
        guarded("calibrate", step)
    assert exit_.value.exit_code == 1
    line = capsys.readouterr().err.strip()
    assert line == (
        "error: calibrate: writing (/out/cal/plots/det.png) failed: no space left on the device; "
        "free some space and run the same command again"
    )


def test_output_lease_is_released_when_the_command_ends(tmp_path: Path) -> None:
    # In one process (typer's CliRunner, a notebook): a second command on the same output
    # must not find the first one's lease still held.
    import typer
    from typer.testing import CliRunner

    from qmag_ray.cli import _support as support

    app = typer.Typer()

    @app.command()
    def write(out: str) -> None:
        held = support.take_output_lease(out, "calibrate")
        typer.echo(f"held {held.held}")

    @app.command()
    def other() -> None:
        pass

    out = str(tmp_path / "o")
    for _ in range(2):
        result = CliRunner().invoke(app, ["write", out])
        assert (result.exit_code, result.output.strip()) == (0, "held True"), result.output
        assert lease.read_holder(out) is None
