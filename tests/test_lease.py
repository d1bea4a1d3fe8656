"""The output lease: one writer per output on local disks and on a real S3-compatible server.

Racing writers are separate processes released together by a shared start file; a dead holder
is a real process killed with SIGKILL. Expectations are counted by hand: of N racers exactly
one holds the lease.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmag_ray import lease

RACER = r"""
import json, os, sys, time
from pathlib import Path
from qmag_ray import lease
uri, go, release = sys.argv[1], sys.argv[2], sys.argv[3]
Path(f"{go}.ready-{os.getpid()}").touch()  # imported: ready to race
while not os.path.exists(go):
    time.sleep(0.005)
try:
    held = lease.acquire(uri, purpose="racer", ttl_s=60)
except lease.LeaseHeldError as exc:
    print(json.dumps({"pid": os.getpid(), "won": False, "message": str(exc)}), flush=True)
    sys.exit(0)
print(json.dumps({"pid": os.getpid(), "won": True}), flush=True)
while not os.path.exists(release):  # held until every racer has tried
    time.sleep(0.01)
held.release()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def race(uri: str, tmp_path: Path, n: int) -> list[dict]:
    """``n`` processes try to take the lease at once; the winner holds it until all have tried."""
    stamp = time.monotonic_ns()
    go, release = tmp_path / f"go-{stamp}", tmp_path / f"release-{stamp}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, uri, str(go), str(release)],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(n)
    ]
    deadline = time.monotonic() + 600
    while len(list(tmp_path.glob(f"go-{stamp}.ready-*"))) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # every racer has imported everything: release them together
    results = [json.loads(proc.stdout.readline()) for proc in procs]
    release.touch()
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    return results


def test_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    with lease.acquire(out, purpose="calibrate") as held:
        assert held.held
        with pytest.raises(lease.LeaseHeldError) as info:
            lease.acquire(out, purpose="calibrate")
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and "calibrate" in message
        assert out in message
        holder = lease.read_holder(out)
        assert holder is not None and holder.token == held.record.token
    assert lease.read_holder(out) is None  # released: free (the record keeps its generation)
    again = lease.acquire(out, purpose="again")
    assert (held.generation, again.generation) == (1, 2)
    again.release()


def test_heartbeat_renews_and_a_takeover_is_noticed(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    held = lease.acquire(out, purpose="calibrate", ttl_s=30, heartbeat_s=0.05)
    first = held.record.heartbeat_utc
    deadline = time.monotonic() + 60
    while lease.read_holder(out).heartbeat_utc == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.read_holder(out).heartbeat_utc > first
    held.check()
    # Someone else's lease replaces ours (as a takeover would): the holder must notice.
    path = tmp_path / "out" / lease.LEASE_NAME
    other = {**json.loads(path.read_bytes()), "token": "someone-else"}
    path.write_text(json.dumps(other))
    deadline = time.monotonic() + 60
    while held.held and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(lease.LeaseLostError, match="taken over"):
        held.check()
    held.release()
    stored = json.loads(path.read_bytes())
    assert stored["token"] == "someone-else" and stored["released_utc"] is None  # not ours


def test_dead_holder_is_taken_over(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    code = (
        "import sys, time\nfrom qmag_ray import lease\n"
        "lease.acquire(sys.argv[1], purpose='doomed', ttl_s=3600)\n"
        "print('held', flush=True)\ntime.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(lease.LeaseHeldError, match=f"pid {proc.pid}"):
            lease.acquire(out, purpose="second")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Its heartbeat is fresh (ttl one hour) but its process is gone on this host: stale.
    with lease.acquire(out, purpose="second") as held:
        assert lease.read_holder(out).token == held.record.token


@pytest.mark.parametrize(
    "stored", [{}, {"generation": 4}], ids=["record-of-an-older-version", "generation-4"]
)
def test_expired_lease_of_another_host_is_taken_over(tmp_path: Path, stored: dict) -> None:
    """An expired lease of another host is taken over with the next fencing generation; a
    record without one (written before fencing existed) reads as generation 1. A fresh lease
    of that host is refused."""
    out = tmp_path / "out"
    out.mkdir()
    old = time.time() - 500
    record = {
        "token": "t-old",
        "purpose": "embed",
        "user": "x",
        "host": "some-other-host",
        "pid": 1,
        "pid_start": "1",
        "created_utc": old,
        "heartbeat_utc": old,
        "ttl_s": 120.0,
        **stored,
    }
    (out / lease.LEASE_NAME).write_text(json.dumps(record))
    before = stored.get("generation", 1)
    assert lease.read_holder(str(out)).generation == before
    fresh = {**record, "heartbeat_utc": time.time()}
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / lease.LEASE_NAME).write_text(json.dumps(fresh))
    with pytest.raises(lease.LeaseHeldError, match="embed by x on host some-other-host"):
        lease.acquire(str(tmp_path / "fresh"), purpose="calibrate")
    with lease.acquire(str(out), purpose="calibrate") as held:
        assert lease.read_holder(str(out)).token == held.record.token != "t-old"
        assert held.generation == before + 1


@pytest.mark.slow
def test_racing_processes_local_exactly_one_wins(tmp_path: Path) -> None:
    results = race(str(tmp_path / "out"), tmp_path, n=6)
    winners = [r for r in results if r["won"]]
    assert len(winners) == 1, results
    for loser in results:
        if not loser["won"]:
            assert f"pid {winners[0]['pid']}" in loser["message"]


@pytest.mark.s3
@pytest.mark.slow
def test_racing_processes_s3_exactly_one_wins(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/runs/out/"
    results = race(uri, tmp_path, n=6)
    winners = [r for r in results if r["won"]]
    assert len(winners) == 1, results
    assert all(f"pid {winners[0]['pid']}" in r["message"] for r in results if not r["won"])
    assert lease.read_holder(uri) is None  # the winner released it


@pytest.mark.s3
def test_s3_refuse_takeover_and_lost(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/calib"
    held = lease.acquire(uri, purpose="recalibrate", ttl_s=30, heartbeat_s=3600)
    with pytest.raises(lease.LeaseHeldError, match="recalibrate"):
        lease.acquire(uri, purpose="recalibrate")
    held.renew()  # conditional on the ETag it wrote
    held.check()
    # Expire it by hand (a heartbeat in the past), then a second writer takes it over.
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    path = f"{uri.removeprefix('s3://')}/{lease.LEASE_NAME}"
    record = json.loads(fs.cat_file(path))
    fs.pipe_file(path, json.dumps({**record, "heartbeat_utc": time.time() - 3600}).encode())
    taker = lease.acquire(uri, purpose="recalibrate")
    held.renew()
    with pytest.raises(lease.LeaseLostError):
        held.check()
    held.release()  # must not remove the taker's lease
    assert lease.read_holder(uri).token == taker.record.token
    taker.release()
    assert lease.read_holder(uri) is None


# ----------------------------------------------------------------------------- fencing

STALLED = r"""
import sys, time
from pathlib import Path
from qmag_ray import lease
uri, go, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
held = lease.acquire(uri, purpose="stalled", ttl_s=2, heartbeat_s=0.5)
print(held.generation, flush=True)
while not go.exists():  # the test stops this process (SIGSTOP) while it waits here
    time.sleep(0.05)
try:
    held.fence()  # the commit point
except lease.LeaseLostError as exc:
    print("refused:", exc, flush=True)
    sys.exit(3)
out.write_text("late write")  # what a commit would write
print("committed", flush=True)
"""


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_stalled_holder_taken_over_is_fenced_off_at_commit(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A real process holds the lease, is frozen (SIGSTOP: its heartbeat thread too) past its
    ttl, is taken over, then resumes and reaches its commit point: refused, nothing written."""
    uri = (
        str(tmp_path / "out")
        if where == "local"
        else f"{request.getfixturevalue('s3_bucket')}/fenced/out"
    )
    go, late = tmp_path / "go", tmp_path / "late.txt"
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED, uri, str(go), str(late)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout.readline().strip() == "1"  # the first holder: generation 1
        proc.send_signal(signal.SIGSTOP)
        taker = None
        deadline = time.monotonic() + 120
        while taker is None:  # refused while its last heartbeat is younger than the ttl
            try:
                taker = lease.acquire(uri, purpose="taker", ttl_s=60)
            except lease.LeaseHeldError:
                assert time.monotonic() < deadline, "the frozen holder's lease never went stale"
                time.sleep(0.2)
        assert taker.generation == 2
        go.touch()
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, out
    assert out.startswith("refused:") and "taken over" in out, out
    assert not late.exists()
    # the late holder left the taker's lease alone; the taker commits, then releases
    assert lease.read_holder(uri).token == taker.record.token
    assert taker.fence() == 2
    taker.release()
    assert lease.acquire(uri, purpose="next").generation == 3


def test_a_fence_handed_to_workers_refuses_after_a_takeover(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    held = lease.acquire(out, purpose="embed", ttl_s=1, heartbeat_s=3600)  # beats stalled
    fence = held.fence_token()
    fence.check()  # held: workers may write
    deadline = time.monotonic() + 60
    while True:
        try:
            taker = lease.acquire(out, purpose="embed")
            break
        except lease.LeaseHeldError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    held.check()  # its own heartbeat never ran, so it does not know ...
    with pytest.raises(lease.LeaseLostError, match="generation 2 now, this writer holds 1"):
        fence.check()  # ... but a worker's commit asks the store
    with pytest.raises(lease.LeaseLostError, match="taken over"):
        held.fence()
    held.release()
    assert lease.read_holder(out).token == taker.record.token  # untouched by the late release
    taker.fence_token().check()
    taker.release()
    with pytest.raises(lease.LeaseLostError, match="released"):
        taker.fence_token().check()
