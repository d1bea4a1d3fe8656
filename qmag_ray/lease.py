"""One writer per output: a lease with an owner, a heartbeat and a fencing generation.

``acquire(output_uri, purpose=...)`` creates ``<output>/.lease.json`` only if it does not exist
(local disks: a hard link of a complete temporary file, under an ``flock`` of
``.lease.json.lock``; S3-compatible stores: ``PutObject`` with ``IfNoneMatch="*"``). A second
writer gets ``LeaseHeldError`` naming the holder. The holder renews the lease from a daemon
thread every ``ttl_s / 4`` seconds (local: replaced under the lock after checking its content;
S3: ``PutObject`` with ``IfMatch=<etag>``). A lease is free when its holder released it, and
stale when its heartbeat is older than ``ttl_s`` or, on the same host, its process no longer
exists; a free or stale lease is taken over by the same conditional replace, so of two writers
finding it so at once only one wins.

Fencing: every record carries a ``generation``, one more than the record it replaced (release
leaves a released record behind, so the count survives it). A holder that stalls past its ttl
(a paused process, a long GC, a suspended VM) and is taken over would otherwise still write when
it wakes: its heartbeat thread stalled with it, so it does not know. ``Lease.fence()`` reads the
lease from the store and raises ``LeaseLostError`` unless it still holds this generation; the
commit points call it right before they write (the embedding parts, on the workers, through
the picklable ``Fence``; the summary; a calibration's results). What remains is the time of one
store request between the check and the write, instead of the whole stall.

The same machinery (``acquire_on`` with any ``LeaseStore``: read, create-if-absent,
replace-if-unchanged) backs the promotion lock in the tracking database
(``qmag_ray.tracking.lock``).

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Protocol

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
    generation: int = 1  # the fencing count: one more than the record it replaced
    released_utc: float | None = None  # set by release: free, the generation kept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        optional = {"generation": 1, "released_utc": None}  # records of older versions
        try:
            raw = json.loads(data)
            fields = {k: raw[k] if k in raw else optional[k] for k in cls.__dataclass_fields__}
            record = cls(**fields)
        except (ValueError, KeyError, TypeError):
            return None  # a lease being written, or damaged: judged by its age alone
        if not isinstance(record.generation, int) or isinstance(record.generation, bool):
            return None
        return record

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


def _store(uri: str) -> _LocalStore | _S3Store:
    if not supported(uri):
        raise ValueError(f"no lease on {storage.protocol(uri)}:// outputs")
    return _LocalStore(uri) if storage.protocol(uri) in ("file", "local") else _S3Store(uri)


# -- the lease -------------------------------------------------------------------------------


class LeaseStore(Protocol):
    """Where a lease lives: whole-record reads and conditional writes; ``version`` is an opaque
    token of one stored state (an ETag, or the content itself)."""

    def read(self) -> tuple[bytes, str] | None: ...

    def create(self, data: bytes) -> str | None: ...  # None: it exists

    def replace(self, data: bytes, expected: str) -> str | None: ...  # None: it changed


class Lease:
    """A held lease; renewed in the background until ``release`` (or the ``with`` block ends).

    ``check()`` is cheap (what the heartbeat found); ``fence()`` asks the store and is what a
    commit point calls right before it writes.
    """

    def __init__(
        self,
        label: str,
        store: LeaseStore,
        record: LeaseRecord,
        version: str,
        heartbeat_s: float,
        lost_error: type[Exception] = LeaseLostError,
        uri: str | None = None,
    ) -> None:
        self.uri = uri if uri is not None else label
        self.label = label  # for messages: the redacted output URI, or the lock's name
        self.record = record
        self.waited_s = 0.0  # how long acquire waited for a live holder
        self.waited_for: str | None = None  # that holder, described
        self._store = store
        self._version = version
        self._lost_error = lost_error
        self._lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_s,), name="qmag-lease", daemon=True
        )
        self._thread.start()

    @property
    def generation(self) -> int:
        """This holder's fencing generation (one more than the holder before it)."""
        return self.record.generation

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a transient store error; retried next beat
                logger.warning("renewing the lease on %s failed: %s", self.label, exc)

    def renew(self) -> None:
        """Write a new heartbeat; marks the lease lost if someone else holds it now."""
        with self._lock:
            if self._lost or self._stop.is_set():
                return
            record = replace(self.record, heartbeat_utc=time.time())
            version = self._store.replace(_encode(record), self._version)
            if version is None:
                self._lose("it was taken over by another writer (its heartbeat was stale)")
                return
            self.record, self._version = record, version

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            logger.error("lost the lease on %s: %s", self.label, why)

    def check(self) -> None:
        """Raise (``LeaseLostError``) if the heartbeat found this lease taken over."""
        if self._lost:
            raise self._lost_error(f"{self.label}: {self._lost}; nothing was committed")

    def fence(self) -> int:
        """Ask the store whether this holder still holds its generation; raise if not.

        Returns the generation. Called right before each commit: a holder that stalled past
        its ttl and was taken over is refused here even though its heartbeat never ran.
        """
        self.check()
        found = self._store.read()
        current = None if found is None else LeaseRecord.from_bytes(found[0])
        why = fenced_out(self.record, current)
        if why:
            self._lose(why)
            self.check()
        return self.generation

    def fence_token(self) -> Fence:
        """A picklable handle for workers that commit on this holder's behalf."""
        return Fence(self.uri, self.record.token, self.generation)

    @property
    def held(self) -> bool:
        return self._lost is None and not self._stop.is_set()

    def release(self) -> None:
        """Stop renewing and mark the lease released (if it is still ours); the released
        record keeps the generation for the next holder."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            if self._lost is None:
                now = time.time()
                done = replace(self.record, heartbeat_utc=now, released_utc=now)
                try:
                    if self._store.replace(_encode(done), self._version) is not None:
                        self._lost = "released"
                except Exception as exc:  # noqa: BLE001 - it goes stale and is taken over
                    logger.warning("could not release the lease on %s: %s", self.label, exc)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def fenced_out(mine: LeaseRecord, current: LeaseRecord | None) -> str | None:
    """Why ``mine`` no longer holds the lease that is ``current`` in the store (None: it does)."""
    if current is None:
        return "its lease is gone from the store"
    if current.token != mine.token or current.generation != mine.generation:
        return (
            f"it was taken over by another writer (generation {current.generation} now, "
            f"this writer holds {mine.generation}: {current.describe()})"
        )
    if current.released_utc is not None:
        return "it was released"
    return None


@dataclass(frozen=True)
class Fence:
    """What a worker needs to check, before it commits, that its run still holds the output."""

    uri: str
    token: str
    generation: int

    def check(self) -> None:
        found = _store(self.uri).read()
        current = None if found is None else LeaseRecord.from_bytes(found[0])
        mine = LeaseRecord(self.token, "", "", "", 0, "", 0.0, 0.0, 0.0, self.generation)
        why = fenced_out(mine, current)
        if why:
            raise LeaseLostError(f"{storage.redact(self.uri)}: {why}; this part was not written")


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(record.to_dict(), sort_keys=True).encode()


def read_holder(uri: str) -> LeaseRecord | None:
    """The live holder of ``uri``'s lease, if any (a damaged or released lease reads as None)."""
    found = _store(uri).read()
    record = None if found is None else LeaseRecord.from_bytes(found[0])
    return None if record is None or record.released_utc is not None else record


def new_record(purpose: str, ttl_s: float, token: str, generation: int = 1) -> LeaseRecord:
    """A record for this process (owner, heartbeat now)."""
    now = time.time()
    return LeaseRecord(
        token=token,
        purpose=purpose,
        user=_user(),
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_start=_process_start(os.getpid()),
        created_utc=now,
        heartbeat_utc=now,
        ttl_s=float(ttl_s),
        generation=generation,
    )


def acquire_on(
    store: LeaseStore,
    label: str,
    *,
    purpose: str,
    ttl_s: float,
    busy: Callable[[LeaseRecord | None], Exception],
    heartbeat_s: float | None = None,
    wait_s: float = 0.0,
    poll_s: float = 1.0,
    max_store_failures: int = 0,
    lost_error: type[Exception] = LeaseLostError,
    uri: str | None = None,
) -> Lease:
    """Take the lease in ``store`` (create it, or take over a released or stale one), waiting up
    to ``wait_s`` for a live holder; then ``busy(holder)`` is raised. Store errors are retried
    ``max_store_failures`` times in a row (0: raised at once)."""
    if not ttl_s > 0:
        raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
    token = uuid.uuid4().hex
    started = time.monotonic()
    unreadable_since: float | None = None
    waited_for: str | None = None
    failures = 0
    while True:
        try:
            got = _try_once(store, label, purpose, ttl_s, token, unreadable_since)
        except Exception as exc:
            failures += 1
            if failures > max_store_failures:
                raise
            logger.warning("lease on %s: store error (%s); trying again", label, exc)
            time.sleep(min(10.0, poll_s * 2**failures))
            continue
        failures = 0
        if got.version is not None:  # held
            held = Lease(
                label, store, got.record, got.version, heartbeat_s or ttl_s / 4, lost_error, uri=uri
            )
            held.waited_s, held.waited_for = time.monotonic() - started, waited_for
            return held
        holder = got.record
        if got.unreadable:
            unreadable_since = unreadable_since or time.monotonic()
        if holder is not None:
            waited_for = holder.describe()
        if time.monotonic() - started >= wait_s:
            raise busy(holder)
        time.sleep(min(poll_s, max(0.05, wait_s - (time.monotonic() - started))))


@dataclass(frozen=True)
class _Attempt:
    record: LeaseRecord | None  # ours when held, else the live holder found (None: none)
    version: str | None = None  # set when held
    unreadable: bool = False


def _try_once(
    store: LeaseStore,
    label: str,
    purpose: str,
    ttl_s: float,
    token: str,
    unreadable_since: float | None,
) -> _Attempt:
    """One attempt: this holder's record and version, or the live holder found (if any)."""
    record = new_record(purpose, ttl_s, token)
    version = store.create(_encode(record))
    if version is not None:
        return _Attempt(record, version)
    found = store.read()
    if found is None:
        return _Attempt(None)  # gone meanwhile: the next attempt creates it
    holder = LeaseRecord.from_bytes(found[0])
    if holder is not None and holder.token == token:  # our own create, retried
        return _Attempt(holder, found[1])
    now = time.time()
    if holder is None:
        if unreadable_since is None or time.monotonic() - unreadable_since <= ttl_s:
            return _Attempt(None, unreadable=True)
        # damaged for a whole ttl: its generation is unknown, so jump past any count
        generation = int(now * 1000)
    elif holder.released_utc is not None or holder.stale(now):
        generation = holder.generation + 1
    else:
        return _Attempt(holder)
    record = replace(record, generation=generation)
    version = store.replace(_encode(record), found[1])
    if version is None:
        return _Attempt(holder)  # another writer took it first
    if holder is not None and holder.released_utc is None:
        logger.warning("took over the stale lease on %s (%s)", label, holder.describe(now))
    elif holder is None:
        logger.warning("took over the stale lease on %s (unreadable)", label)
    return _Attempt(record, version)


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
    live holder to finish before giving up. A released or stale lease is taken over (a stale
    one is logged).
    """
    return acquire_on(
        _store(uri),
        storage.redact(uri),
        purpose=purpose,
        ttl_s=ttl_s,
        busy=lambda holder: LeaseHeldError(uri, holder),
        heartbeat_s=heartbeat_s,
        wait_s=wait_s,
        uri=uri,
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


__all__ = [
    "DEFAULT_TTL_S",
    "LEASE_NAME",
    "Fence",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "LeaseRecord",
    "LeaseStore",
    "acquire",
    "acquire_on",
    "new_record",
    "read_holder",
    "supported",
]
