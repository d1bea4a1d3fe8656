"""One writer per output: a lease file with an owner and a heartbeat, created atomically.

``acquire(output_uri, purpose=...)`` creates ``<output>/.lease.json`` only if it does not exist
(local disks: a hard link of a complete temporary file, under an ``flock`` of
``.lease.json.lock``; S3-compatible stores: ``PutObject`` with ``IfNoneMatch="*"``). A second
writer gets ``LeaseHeldError`` naming the holder. The holder renews the lease from a daemon
thread every ``ttl_s / 4`` seconds (local: replaced under the lock after checking the token;
S3: ``PutObject`` with ``IfMatch=<etag>``), and removes it on release. A lease is stale when its
heartbeat is older than ``ttl_s`` or, on the same host, its process no longer exists; a stale
lease is taken over by the same conditional replace, so of two writers finding it stale at once
only one wins. Writers call ``lease.check()`` before committing (a summary, a registration):
it raises ``LeaseLostError`` if the lease was taken over meanwhile.

Scope: every writer of an output must take the lease on the same URI; heartbeats compare
wall clocks, so the hosts' clocks must agree to well within ``ttl_s``. Stores other than local
paths and ``s3://`` have no lease (``supported`` says so; callers warn).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from qmag_ray import storage

logger = logging.getLogger(__name__)

LEASE_NAME = ".lease.json"
DEFAULT_TTL_S = 120.0


class LeaseHeldError(RuntimeError):
    """Another live writer holds the output's lease."""

    def __init__(self, uri: str, holder: LeaseRecord | None) -> None:
        self.uri = uri
        self.holder = holder
        who = holder.describe() if holder else "a writer that is still creating its lease"
        super().__init__(
            f"another writer holds {storage.redact(uri)}: {who}. Wait for it to finish; if it "
            f"is gone, its lease is taken over automatically once stale"
        )


class LeaseLostError(RuntimeError):
    """This writer's lease expired and another writer took the output over."""


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease file says: who holds it, since when, when it was last renewed."""

    token: str
    purpose: str
    user: str
    host: str
    pid: int
    pid_start: str
    created_utc: float
    heartbeat_utc: float
    ttl_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None  # a lease being written, or damaged: judged by its age alone

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = datetime.fromtimestamp(self.created_utc, timezone.utc).strftime("%Y-%m-%d %H:%M")
        return (
            f"{self.purpose} by {self.user} on host {self.host}, pid {self.pid}, since {since} UTC "
            f"(last heartbeat {max(0.0, now - self.heartbeat_utc):.0f} s ago, stale after "
            f"{self.ttl_s:.0f} s)"
        )

    def stale(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self.heartbeat_utc > self.ttl_s:
            return True
        return self.host == socket.gethostname() and _process_start(self.pid) != self.pid_start


def _process_start(pid: int) -> str:
    """An identity of a live process (its start time in clock ticks), '' when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            pass
        return "alive"


def supported(uri: str) -> bool:
    """Whether outputs at ``uri`` can be leased (local paths and ``s3://``)."""
    return storage.protocol(uri) in ("file", "local", "s3", "s3a")


# -- stores: create if absent / read / replace if unchanged / delete if unchanged -------------


class _LocalStore:
    def __init__(self, uri: str) -> None:
        self.path = os.path.join(os.path.abspath(uri.removeprefix("file://")), LEASE_NAME)

    @contextlib.contextmanager
    def _locked(self):  # type: ignore[no-untyped-def]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data.decode("utf-8", "replace")

    def _write(self, data: bytes, *, overwrite: bool) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if overwrite:
                os.replace(tmp, self.path)
            else:
                os.link(tmp, self.path)  # atomic, fails when the name exists
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def create(self, data: bytes) -> str | None:
        with self._locked():
            try:
                self._write(data, overwrite=False)
            except FileExistsError:
                return None
        return data.decode()

    def replace(self, data: bytes, expected: str) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != expected:
                return None
            self._write(data, overwrite=True)
        return data.decode()

    def delete(self, expected: str) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != expected:
                return False
            os.unlink(self.path)
        return True


# A condition that did not hold: the object exists (create), changed or vanished (replace).
_LOST = ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey", "404")


def _s3_code(exc: BaseException) -> str | None:
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code"))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


class _S3Store:
    def __init__(self, uri: str) -> None:
        self.fs, path = storage.filesystem(storage.join(uri, LEASE_NAME))
        self.bucket, _, self.key = path.partition("/")

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            out = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition
            )
        except Exception as exc:
            if _s3_code(exc) in _LOST:
                return None
            raise
        return str(out["ETag"])

    def read(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        async def _get() -> tuple[bytes, str]:
            out = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with out["Body"] as stream:
                return bytes(await stream.read()), str(out["ETag"])

        try:
            return sync(self.fs.loop, _get)
        except Exception as exc:
            if isinstance(exc, FileNotFoundError) or _s3_code(exc) in ("NoSuchKey", "404"):
                return None
            raise

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, expected: str) -> str | None:
        return self._put(data, IfMatch=expected)

    def delete(self, expected: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=expected)
        except Exception as exc:
            if _s3_code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return False
            raise
        return True


def _store(uri: str) -> _LocalStore | _S3Store:
    if not supported(uri):
        raise ValueError(f"no lease on {storage.protocol(uri)}:// outputs")
    return _LocalStore(uri) if storage.protocol(uri) in ("file", "local") else _S3Store(uri)


# -- the lease -------------------------------------------------------------------------------


class Lease:
    """A held lease; renewed in the background until ``release`` (or the ``with`` block ends)."""

    def __init__(self, uri: str, store: Any, record: LeaseRecord, version: str, heartbeat_s: float):
        self.uri = uri
        self.record = record
        self._store = store
        self._version = version
        self._lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_s,), name="qmag-lease", daemon=True
        )
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a transient store error; retried next beat
                logger.warning("renewing the lease on %s failed: %s", storage.redact(self.uri), exc)

    def renew(self) -> None:
        """Write a new heartbeat; marks the lease lost if someone else holds it now."""
        with self._lock:
            if self._lost or self._stop.is_set():
                return
            record = LeaseRecord(**{**self.record.to_dict(), "heartbeat_utc": time.time()})
            version = self._store.replace(_encode(record), self._version)
            if version is None:
                self._lost = "the lease was taken over by another writer (its heartbeat was stale)"
                logger.error("lost the lease on %s: %s", storage.redact(self.uri), self._lost)
                return
            self.record, self._version = record, version

    def check(self) -> None:
        """Raise ``LeaseLostError`` if this writer no longer holds the output."""
        if self._lost:
            raise LeaseLostError(f"{storage.redact(self.uri)}: {self._lost}; nothing was committed")

    @property
    def held(self) -> bool:
        return self._lost is None and not self._stop.is_set()

    def release(self) -> None:
        """Stop renewing and remove the lease file (if it is still ours)."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            if self._lost is None:
                try:
                    self._store.delete(self._version)
                except Exception as exc:  # noqa: BLE001 - it goes stale and is taken over
                    logger.warning(
                        "could not remove the lease on %s: %s", storage.redact(self.uri), exc
                    )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(record.to_dict(), sort_keys=True).encode()


def read_holder(uri: str) -> LeaseRecord | None:
    """The current holder of ``uri``'s lease, if any (a damaged lease reads as None)."""
    found = _store(uri).read()
    return None if found is None else LeaseRecord.from_bytes(found[0])


def acquire(
    uri: str,
    *,
    purpose: str,
    ttl_s: float = DEFAULT_TTL_S,
    heartbeat_s: float | None = None,
    wait_s: float = 0.0,
) -> Lease:
    """Take the lease on output ``uri`` or raise ``LeaseHeldError`` naming its holder.

    ``purpose`` says what the holder does (``"calibrate"``); ``wait_s`` waits that long for a
    live holder to finish before giving up. A stale lease is taken over (and logged).
    """
    if not ttl_s > 0:
        raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
    store = _store(uri)
    deadline = time.monotonic() + wait_s
    unreadable_since: float | None = None
    while True:
        now = time.time()
        record = LeaseRecord(
            token=uuid.uuid4().hex,
            purpose=purpose,
            user=_user(),
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=_process_start(os.getpid()),
            created_utc=now,
            heartbeat_utc=now,
            ttl_s=float(ttl_s),
        )
        data = _encode(record)
        version = store.create(data)
        if version is None:
            found = store.read()
            if found is None:
                continue  # released meanwhile: try again at once
            holder = LeaseRecord.from_bytes(found[0])
            if holder is None:
                unreadable_since = unreadable_since or time.monotonic()
                takeover = time.monotonic() - unreadable_since > ttl_s
            else:
                takeover = holder.stale(now)
            if takeover:
                version = store.replace(data, found[1])
                if version is not None:
                    logger.warning(
                        "took over the stale lease on %s (%s)",
                        storage.redact(uri),
                        holder.describe(now) if holder else "unreadable",
                    )
        if version is not None:
            return Lease(uri, store, record, version, heartbeat_s or ttl_s / 4)
        if time.monotonic() >= deadline:
            raise LeaseHeldError(uri, read_holder(uri))
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


__all__ = [
    "DEFAULT_TTL_S",
    "LEASE_NAME",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "LeaseRecord",
    "acquire",
    "read_holder",
    "supported",
]
