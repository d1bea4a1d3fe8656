"""A lock in the tracking database: one promotion of a registered model at a time.

MLflow has no compare-and-set on aliases, but creating a registered model is atomic in its
store (the name is the primary key; a second create fails with ``RESOURCE_ALREADY_EXISTS``).
The lock for ``qmagface`` is the registered model ``qmagface.promotion-lock``; its one tag
``qmag_ray.lock`` holds a ``lease.LeaseRecord`` (owner, heartbeat, ttl) as JSON, renewed from a
daemon thread. Everything that moves the ``champion`` alias talks to the same tracking server,
so the lock lives exactly where the alias does and needs nothing else from the deployment.

A stale lock (heartbeat older than its ttl, or its process gone on this host) is removed by
the one process that creates the marker ``<lock>.takeover-<token>`` (again an atomic create);
it re-reads the lock's token right before deleting it, then everyone competes on the create.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from qmag_ray.lease import LeaseRecord, _process_start, _user

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

TAG = "qmag_ray.lock"
DEFAULT_TTL_S = 120.0
DEFAULT_WAIT_S = 900.0
MAX_STORE_FAILURES = 8  # consecutive store errors while acquiring before giving up


class RegistryLockBusyError(RuntimeError):
    """The lock stayed held by another live process for the whole wait."""


class RegistryLockLostError(RuntimeError):
    """This process's lock expired and was taken over; it must not move the alias."""


def lock_name(model_name: str) -> str:
    return f"{model_name}.promotion-lock"


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


class RegistryLock:
    """A held lock; ``check()`` before acting, ``release()`` (or leave the ``with``) after."""

    def __init__(self, client: MlflowClient, name: str, record: LeaseRecord, heartbeat_s: float):
        self.name = name
        self.record = record
        self.waited_s = 0.0
        self.waited_for: str | None = None
        self._client = client
        self._lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_s,), name="qmag-registry-lock", daemon=True
        )
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                holder = _read(self._client, self.name)
                if holder is None or holder.token != self.record.token:
                    self._lost = True
                    logger.error("lost the promotion lock %s (taken over)", self.name)
                    return
                self.record = LeaseRecord(**{**self.record.to_dict(), "heartbeat_utc": time.time()})
                self._client.set_registered_model_tag(self.name, TAG, _encode(self.record))
            except Exception as exc:  # noqa: BLE001 - transient; the next beat retries
                logger.warning("renewing the promotion lock %s failed: %s", self.name, exc)

    def check(self) -> None:
        """Raise ``RegistryLockLostError`` unless the lock in the store is still this one."""
        holder = None if self._lost else _read(self._client, self.name)
        if holder is None or holder.token != self.record.token:
            self._lost = True
            raise RegistryLockLostError(
                f"the promotion lock {self.name} expired and was taken over by "
                f"{holder.describe() if holder else 'nobody'}; the alias was not moved"
            )

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            holder = _read(self._client, self.name)
            if holder is not None and holder.token == self.record.token:
                self._client.delete_registered_model(self.name)
        except Exception as exc:  # noqa: BLE001 - it goes stale and is taken over
            logger.warning("could not release the promotion lock %s: %s", self.name, exc)

    def __enter__(self) -> RegistryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _encode(record: LeaseRecord) -> str:
    return json.dumps(record.to_dict(), sort_keys=True)


def _read(client: MlflowClient, name: str) -> LeaseRecord | None:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    raw = model.tags.get(TAG)
    record = LeaseRecord.from_bytes(raw.encode()) if raw else None
    if record is None:  # a lock created by something else, or damaged: stale by its age
        updated = (model.last_updated_timestamp or 0) / 1000
        record = LeaseRecord("unknown", "unknown", "?", "?", 0, "", updated, updated, 60.0)
    return record


def _create(client: MlflowClient, name: str, tags: dict[str, str], description: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags=tags, description=description)
    except MlflowException as exc:
        if _code(exc) == "RESOURCE_ALREADY_EXISTS":
            return False
        raise
    return True


def _delete(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(name)
    except MlflowException as exc:
        if _code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise


def _take_over(client: MlflowClient, name: str, stale: LeaseRecord) -> None:
    """Remove a stale lock, if this process wins the right to (one marker per stale token)."""
    marker = f"{name}.takeover-{stale.token}"
    if not _create(client, marker, {"qmag_ray.created_utc": repr(time.time())}, "takeover"):
        try:
            created = float(client.get_registered_model(marker).tags["qmag_ray.created_utc"])
        except Exception:  # noqa: BLE001 - gone meanwhile or damaged
            return
        if time.time() - created > stale.ttl_s:  # its taker died half-way
            _delete(client, marker)
        return
    try:
        current = _read(client, name)
        if current is not None and current.token == stale.token:
            logger.warning("taking over the stale promotion lock %s (%s)", name, stale.describe())
            _delete(client, name)
    finally:
        _delete(client, marker)


def acquire(
    model_name: str,
    *,
    purpose: str = "promotion",
    ttl_s: float = DEFAULT_TTL_S,
    wait_s: float = DEFAULT_WAIT_S,
    poll_s: float = 0.5,
    client: MlflowClient | None = None,
) -> RegistryLock:
    """Hold ``model_name``'s promotion lock, waiting up to ``wait_s`` for a live holder."""
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    name = lock_name(model_name)
    started = time.monotonic()
    token = uuid.uuid4().hex
    waited_for: str | None = None
    failures = 0
    while True:
        try:
            lock = _try_once(client, name, model_name, token, purpose, ttl_s)
        except Exception as exc:  # noqa: BLE001 - an overloaded or unreachable store
            failures += 1
            if failures > MAX_STORE_FAILURES:
                raise
            logger.warning("promotion lock %s: store error (%s); trying again", name, exc)
            time.sleep(min(10.0, poll_s * 2**failures))
            continue
        failures = 0
        if isinstance(lock, RegistryLock):
            lock.waited_s = time.monotonic() - started
            lock.waited_for = waited_for
            return lock
        holder = lock
        if holder is not None:
            waited_for = holder.describe()
        if time.monotonic() - started >= wait_s:
            raise RegistryLockBusyError(
                f"another promotion of {model_name} holds its lock: "
                f"{holder.describe() if holder else 'released just now'}; waited {wait_s:.0f} s"
            )
        time.sleep(poll_s)


def _try_once(
    client: MlflowClient, name: str, model_name: str, token: str, purpose: str, ttl_s: float
) -> RegistryLock | LeaseRecord | None:
    """One attempt: the held lock, or the live holder found (None: it just went away)."""
    now = time.time()
    record = LeaseRecord(
        token=token,
        purpose=purpose,
        user=_user(),
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_start=_process_start(os.getpid()),
        created_utc=now,
        heartbeat_utc=now,
        ttl_s=float(ttl_s),
    )
    description = f"lock: promotions of {model_name} (qmag-ray); not a model"
    created = _create(client, name, {TAG: _encode(record)}, description)
    holder = None
    if not created:
        holder = _read(client, name)
        created = holder is not None and holder.token == token  # our own retried create
        if holder is not None and not created and holder.stale(now):
            _take_over(client, name, holder)
            return None
    if created:
        return RegistryLock(client, name, holder or record, ttl_s / 4)
    return holder
