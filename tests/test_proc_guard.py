"""The suite stops what it started however a run ends, and never touches anything else.

Regression test for "a `make test` stopped part-way (Ctrl-C, a timeout) left 21 processes
running" (issue 12, item 9). An inner pytest run, with this suite's real conftest loaded as a
plugin, starts a server-like process tree in sessions of its own through ``proc_guard.spawn``
and is then killed (SIGKILL), interrupted (SIGINT to its process group, like Ctrl-C) or timed
out (SIGTERM). Afterwards the tree must be gone, and a process this test started without
registering it must still run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

INNER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import proc_guard

    SERVER = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{marker}'],"
        " start_new_session=True);"
        "time.sleep(600)"
    )

    def test_start_a_server_then_hang(tmp_path):
        marker = os.environ["GUARD_MARKER"]
        proc = proc_guard.spawn(
            [sys.executable, "-c", SERVER.format(marker=marker)],
            name="fake server", log=tmp_path / "log", marker=marker,
        )
        Path(os.environ["GUARD_READY"]).write_text(json.dumps({"server": proc.pid}))
        time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _marked(marker: str) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and _alive(int(entry)):
                found.add(int(entry))
    return found


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _inner_env(tmp_path: Path, marker: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{TESTS}{os.pathsep}{env.get('PYTHONPATH', '')}",
        QMAG_TEST_PROCS=str(tmp_path / "registry"),
        GUARD_MARKER=marker,
        GUARD_READY=str(tmp_path / "ready.json"),
    )
    return env


def _inner_pytest(test_file: str) -> list[str]:
    """An inner pytest run of ``test_file`` with this suite's conftest (its process guard)."""
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "conftest",
        "-q",
        "-p",
        "no:cacheprovider",
        test_file,
    ]


def _run_inner(tmp_path: Path, marker: str) -> tuple[subprocess.Popen, int]:
    """Start the inner run; return it and its fake server's pid once the server runs."""
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(INNER)
    proc = subprocess.Popen(
        _inner_pytest(str(inner / "test_inner.py")),
        cwd=inner,
        env=_inner_env(tmp_path, marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # and, as there, Ctrl-C's default action: a suite started in the background by a
        # non-interactive shell inherits SIGINT ignored, which would make the Ctrl-C case hang
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    ready = tmp_path / "ready.json"
    assert _wait_until(ready.exists, 120), "the inner test never started its server"
    server = json.loads(ready.read_text())["server"]
    assert _wait_until(lambda: len(_marked(marker)) >= 2, 60)  # the server and its daemon
    return proc, server


@pytest.fixture()
def bystander():
    """A process of ours that no guard knows about: it must survive every clean-up."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    [
        ("SIGKILL of pytest", lambda p: os.kill(p.pid, signal.SIGKILL)),
        ("Ctrl-C", lambda p: os.killpg(p.pid, signal.SIGINT)),
        ("timeout (SIGTERM)", lambda p: os.kill(p.pid, signal.SIGTERM)),
    ],
    ids=lambda h: h[0],
)
def test_a_run_that_dies_leaves_nothing_behind(tmp_path: Path, bystander, how) -> None:
    marker = f"guard-{os.getpid()}-{tmp_path.name}"
    proc, server = _run_inner(tmp_path, marker)
    how[1](proc)
    proc.wait(timeout=60)
    assert _wait_until(lambda: not _marked(marker) and not _alive(server), 60), (
        f"still running after '{how[0]}': {sorted(_marked(marker))}"
    )
    registry = tmp_path / "registry"
    assert _wait_until(lambda: not list(registry.glob("*.json")), 30)  # records dropped
    assert bystander.poll() is None  # never a process the guard did not start


@pytest.mark.slow
def test_the_next_run_reaps_leftovers_it_can_prove_are_its_own(tmp_path: Path, bystander) -> None:
    import proc_guard

    registry = tmp_path / "registry"
    registry.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # an owner that no longer exists
    marker = f"leftover-{os.getpid()}-{tmp_path.name}"
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", marker], start_new_session=True
    )
    _wait_until(lambda: proc_guard.start_time(leftover.pid) is not None, 10)
    records = {
        # ours: pid and start time match -> stopped
        leftover.pid: {"start": proc_guard.start_time(leftover.pid), "marker": marker},
        # a reused pid: same pid, another start time -> must not be touched
        bystander.pid: {"start": proc_guard.start_time(bystander.pid) - 1, "marker": None},
    }
    for pid, fields in records.items():
        record = {"pid": pid, "name": "x", "owner": gone.pid, "owner_start": 1, **fields}
        (registry / f"{pid}.json").write_text(json.dumps(record))

    env = _inner_env(tmp_path, marker)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    done = subprocess.run(
        _inner_pytest("test_nothing.py"),
        cwd=tmp_path / "empty",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stopped a leftover of an earlier test run" in done.stdout
    assert _wait_until(lambda: leftover.poll() is not None, 30)
    assert bystander.poll() is None
    assert list(registry.glob("*.json")) == []
