"""Every process the test suite starts is stopped when the run ends, however it ends.

Servers that tests launch (``ray start``, ``mlflow server``, moto) run in sessions of their own,
so neither Ctrl-C in the terminal nor the end of pytest reaches them. This module keeps a
registry of what this checkout's test runs started (``.pytest-procs/`` at the repository root,
one JSON record per launched process) and stops it in three places:

1. the fixture that started a process stops it (``stop_tree``) and drops its record;
2. a watchdog process, started with the session and detached from it, waits for the pytest
   process to disappear (killed, interrupted, timed out) and stops whatever that run still had
   registered;
3. at session start, leftovers of an earlier run of this checkout whose owner is gone are
   stopped (the reaper), e.g. after the machine's watchdog itself was killed.

A process is only ever signalled when it is provably one of ours: its pid AND its kernel start
time match the record (pids are reused), or it descends from such a process, or its command
line or working directory names the unique temp dir recorded with it. Nothing here imports
``qmag_ray``; it uses only the standard library, so the watchdog can run it as a script.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: One record per launched process; QMAG_TEST_PROCS moves it (the guard's own tests do).
REGISTRY = Path(os.environ.get("QMAG_TEST_PROCS") or REPO / ".pytest-procs")
STOP_GRACE = 10.0


# ----------------------------------------------------------------------------- /proc helpers


def start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` (clock ticks since boot), ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _mentions(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if marker in cmdline.decode(errors="replace"):
            return True
        return os.readlink(f"/proc/{pid}/cwd").startswith(marker)
    except OSError:
        return False


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def tree(root: int, marker: str | None = None) -> set[int]:
    """``root``, its descendants, and every process naming ``marker`` (never this process)."""
    pids = _pids()
    parents = {pid: _parent(pid) for pid in pids}
    found = {root} if root in parents else set()
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                changed = True
    if marker:
        found |= {pid for pid in pids if _mentions(pid, marker)}
    found.discard(os.getpid())
    return found


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if start_time(pid) is not None}


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(root: int, marker: str | None = None) -> None:
    """SIGKILL ``root``'s tree (see :func:`tree`) at once: a machine that is lost."""
    _signal(tree(root, marker), signal.SIGKILL)


def stop_tree(root: int, marker: str | None = None, grace: float = STOP_GRACE) -> None:
    """SIGTERM ``root``'s tree (see :func:`tree`), a grace period, then SIGKILL what is left."""
    pids = tree(root, marker)
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pids) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)
        time.sleep(0.2)
    for _ in range(3):  # anything spawned while we looked
        pids = _alive(pids | tree(root, marker) if start_time(root) else pids)
        if marker:
            pids |= _alive(tree(-1, marker))
        if not pids:
            break
        _signal(pids, signal.SIGKILL)
        time.sleep(0.5)


# ----------------------------------------------------------------------------- the registry


def _record_path(pid: int) -> Path:
    return REGISTRY / f"{pid}.json"


def register(pid: int, name: str, marker: str | None = None) -> None:
    """Record a process this run started (call right after starting it)."""
    REGISTRY.mkdir(exist_ok=True)
    owner = os.getpid()
    record = {
        "pid": pid,
        "start": start_time(pid),
        "name": name,
        "marker": marker,
        "owner": owner,
        "owner_start": start_time(owner),
    }
    tmp = _record_path(pid).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(_record_path(pid))


def unregister(pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        _record_path(pid).unlink()


def spawn(
    args: list[str],
    *,
    name: str,
    log: Path,
    env: dict[str, str] | None = None,
    marker: str | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen:
    """Start ``args`` in a session of its own, output to ``log``, registered for clean-up."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    register(proc.pid, name, marker)
    return proc


def stop(proc: subprocess.Popen, marker: str | None = None, grace: float = STOP_GRACE) -> None:
    """Stop a process started by :func:`spawn` (and its tree), reap it, drop its record."""
    try:
        stop_tree(proc.pid, marker, grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    finally:
        unregister(proc.pid)


def _records() -> list[dict]:
    found = []
    if not REGISTRY.is_dir():
        return found
    for path in REGISTRY.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            found.append(json.loads(path.read_text()))
    return found


def _owner_alive(record: dict) -> bool:
    return start_time(record["owner"]) == record["owner_start"] is not None


def reap(owner: int | None = None) -> list[str]:
    """Stop what runs whose owner is gone left behind (only ``owner``'s if given).

    Returns a line per record handled, for the session's report.
    """
    handled = []
    for record in _records():
        if owner is not None and record["owner"] != owner:
            continue
        if _owner_alive(record):
            continue
        pid, marker = int(record["pid"]), record.get("marker")
        ours = record["start"] is not None and start_time(pid) == record["start"]
        if ours:
            stop_tree(pid, marker)
        elif marker:  # the root is gone; its helpers still name our unique temp dir
            pids = _alive(tree(-1, marker))
            if pids:
                _signal(pids, signal.SIGKILL)
        handled.append(f"{record['name']} (pid {pid}) left by test run {record['owner']}")
        unregister(pid)
    return handled


# ----------------------------------------------------------------------------- the watchdog


def start_watchdog() -> subprocess.Popen:
    """A detached process that cleans up after this pytest process once it is gone."""
    owner = os.getpid()
    return subprocess.Popen(
        [sys.executable, __file__, "watch", str(owner), str(start_time(owner))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _watch(owner: int, owner_start: int) -> None:
    while start_time(owner) == owner_start:
        time.sleep(0.5)
    reap(owner)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "watch":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for pytest, not for its watchdog
    _watch(int(sys.argv[2]), int(sys.argv[3]))
