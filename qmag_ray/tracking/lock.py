"""A lock in the tracking database: one promotion of a registered model at a time.

MLflow has no compare-and-set on aliases, but creating a registered model is atomic in its
store (the name is the primary key; a second create fails with ``RESOURCE_ALREADY_EXISTS``).
The lock for ``qmagface`` is the registered model ``qmagface.promotion-lock``; its one tag
``qmag_ray.lock`` holds a ``lease.LeaseRecord`` (owner, heartbeat, ttl, fencing generation) as
JSON. Heartbeats, takeover of a released or stale lock, generations and fencing are those of
the output lease (``qmag_ray.lease.acquire_on``); this module only supplies the store:

- create: ``create_registered_model(lock, tags={qmag_ray.lock: record})``;
- replace-if-unchanged: MLflow cannot compare a tag and set it, so a replace first creates the
  marker model ``<lock>.cas-<digest of the expected record>`` (atomic; one replacer per stored
  state), re-reads the tag, writes it only if it is still the expected record, and deletes the
  marker. A marker older than the ttl (its writer died half-way) is removed by the next one.

Release leaves the lock model with a released record, so the next holder's generation is one
more. The alias move is fenced (``promotion.move_gated``): ``fence()`` re-reads the lock right
before the move, and the registered model's tag ``qmag_ray.promotion_generation`` records the
generation of the last move, so a later move by an older generation is refused.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING

from qmag_ray.lease import Lease, LeaseRecord, acquire_on

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

TAG = "qmag_ray.lock"
GENERATION_TAG = "qmag_ray.promotion_generation"
DEFAULT_TTL_S = 120.0
DEFAULT_WAIT_S = 900.0
MAX_STORE_FAILURES = 8  # consecutive store errors while acquiring before giving up


class RegistryLockBusyError(RuntimeError):
    """The lock stayed held by another live process for the whole wait."""


class RegistryLockLostError(RuntimeError):
    """This process's lock expired and was taken over; it must not move the alias."""


RegistryLock = Lease  # a held promotion lock: ``fence()`` before moving, ``release()`` after


def lock_name(model_name: str) -> str:
    return f"{model_name}.promotion-lock"


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


class RegistryStore:
    """``lease.LeaseStore`` on a registered model's tag (see the module docstring)."""

    def __init__(self, client: MlflowClient, name: str, description: str, ttl_s: float) -> None:
        self.client, self.name, self.description, self.ttl_s = client, name, description, ttl_s

    def read(self) -> tuple[bytes, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if _code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        raw = model.tags.get(TAG)
        if not raw:  # made by something else, or damaged: unreadable, stale after a ttl
            return b"", f"untagged-{model.last_updated_timestamp}"
        return raw.encode(), raw

    def create(self, data: bytes) -> str | None:
        if not _create(self.client, self.name, {TAG: data.decode()}, self.description):
            return None
        return data.decode()

    def replace(self, data: bytes, expected: str) -> str | None:
        marker = f"{self.name}.cas-{hashlib.sha256(expected.encode()).hexdigest()[:20]}"
        if not _create(self.client, marker, {"qmag_ray.created_utc": repr(time.time())}, "cas"):
            self._clear_dead_marker(marker)
            return None
        try:
            current = self.read()
            if current is None or current[1] != expected:
                return None
            self.client.set_registered_model_tag(self.name, TAG, data.decode())
            return data.decode()
        finally:
            _delete(self.client, marker)

    def _clear_dead_marker(self, marker: str) -> None:
        try:
            created = float(self.client.get_registered_model(marker).tags["qmag_ray.created_utc"])
        except Exception:  # noqa: BLE001 - gone meanwhile, or damaged
            return
        if time.time() - created > self.ttl_s:  # its writer died half-way
            _delete(self.client, marker)


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


def acquire(
    model_name: str,
    *,
    purpose: str = "promotion",
    ttl_s: float = DEFAULT_TTL_S,
    wait_s: float = DEFAULT_WAIT_S,
    poll_s: float = 0.5,
    client: MlflowClient | None = None,
    heartbeat_s: float | None = None,
) -> Lease:
    """Hold ``model_name``'s promotion lock, waiting up to ``wait_s`` for a live holder."""
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    name = lock_name(model_name)
    description = f"lock: promotions of {model_name} (qmag-ray); not a model"

    def busy(holder: LeaseRecord | None) -> Exception:
        return RegistryLockBusyError(
            f"another promotion of {model_name} holds its lock: "
            f"{holder.describe() if holder else 'released just now'}; waited {wait_s:.0f} s"
        )

    return acquire_on(
        RegistryStore(client, name, description, ttl_s),
        f"the promotion lock {name}",
        purpose=purpose,
        ttl_s=ttl_s,
        busy=busy,
        heartbeat_s=heartbeat_s,
        wait_s=wait_s,
        poll_s=poll_s,
        max_store_failures=MAX_STORE_FAILURES,
        lost_error=RegistryLockLostError,
    )


def check_generation(client: MlflowClient, model_name: str, held: Lease) -> None:
    """Refuse a move by a holder older than the last one that moved ``model_name``'s alias."""
    raw = client.get_registered_model(model_name).tags.get(GENERATION_TAG)
    last = int(raw) if raw and raw.isdigit() else 0
    if last > held.generation:
        raise RegistryLockLostError(
            f"{held.label}: an alias of {model_name} was moved by lock generation {last}, after "
            f"this holder's {held.generation} was taken over; the alias was not moved"
        )


def record_generation(client: MlflowClient, model_name: str, held: Lease) -> None:
    client.set_registered_model_tag(model_name, GENERATION_TAG, str(held.generation))
