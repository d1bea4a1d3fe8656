"""Fencing of the promotion lock: a holder that stalled past its ttl and was taken over cannot
move the alias when it wakes (issue 12).

A real SQLite tracking store. The stalled holder is one whose heartbeat never runs (it is
frozen as far as the store can tell); the takeover is the package's own ``acquire``. Expected
generations are counted by hand: 1 for the first holder, one more for each later one.
"""

from __future__ import annotations

import json
import time

import pytest
from mlflow_fixtures import make_calibration, sqlite_tracking  # noqa: F401 - fixture

pytestmark = pytest.mark.mlflow


def _versions(name: str, n: int) -> list[str]:
    from qmag_ray.tracking.registry import register_scorer
    from qmag_ray.tracking.runs import tracked_run

    with tracked_run(kind="calibrate", run_name="fencing"):
        return [
            str(register_scorer(make_calibration(0.05 + i / 100, 0.12), model_name=name).version)
            for i in range(n)
        ]


def test_a_stalled_lock_holder_is_refused_after_a_takeover(sqlite_tracking: str) -> None:  # noqa: F811
    from mlflow import MlflowClient

    from qmag_ray.tracking import lock
    from qmag_ray.tracking.gate import GateDecision
    from qmag_ray.tracking.promotion import move_gated
    from qmag_ray.tracking.registry import CHAMPION, alias_version, set_alias

    name = "fence-stalled"
    v1, v2 = _versions(name, 2)
    set_alias(name, CHAMPION, v1)
    client = MlflowClient()
    stalled = lock.acquire(name, purpose="stalled", ttl_s=1, heartbeat_s=3600, client=client)
    assert stalled.generation == 1
    deadline = time.monotonic() + 60
    while True:  # the stalled holder's heartbeat is older than its ttl: taken over
        try:
            taker = lock.acquire(name, purpose="taker", ttl_s=60, wait_s=0, client=client)
            break
        except lock.RegistryLockBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert taker.generation == 2
    stalled.check()  # its heartbeat never ran: it does not know ...
    with pytest.raises(lock.RegistryLockLostError, match="generation 2 now, this writer holds 1"):
        stalled.fence()  # ... the commit point asks the store
    taker.release()

    def promote(current) -> tuple[GateDecision, None]:
        return GateDecision(True, [f"PASS: better than {current.version}"]), None

    moved = move_gated(name, v2, promote, lock_ttl_s=60)  # the next holder: generation 3
    assert moved.promoted and str(alias_version(name, CHAMPION).version) == v2
    tags = client.get_registered_model(name).tags
    assert tags[lock.GENERATION_TAG] == "3"
    # an alias move by the stalled holder is refused by the recorded generation as well
    with pytest.raises(lock.RegistryLockLostError, match="moved by lock generation 3"):
        lock.check_generation(client, name, stalled)
    stalled.release()  # must not release the lock model of a later holder
    record = json.loads(client.get_registered_model(lock.lock_name(name)).tags[lock.TAG])
    assert record["generation"] == 3 and record["released_utc"] is not None


def test_move_gated_refuses_when_its_lock_was_taken_over_during_the_gate(
    sqlite_tracking: str,  # noqa: F811
) -> None:
    from mlflow import MlflowClient

    from qmag_ray.tracking import lock
    from qmag_ray.tracking.gate import GateDecision
    from qmag_ray.tracking.promotion import move_gated
    from qmag_ray.tracking.registry import CHAMPION, alias_version, set_alias

    name = "fence-gate"
    v1, v2, v3 = _versions(name, 3)
    set_alias(name, CHAMPION, v1)
    client = MlflowClient()

    def stall_then_promote(current) -> tuple[GateDecision, None]:
        # While this promotion judged (say it paused for longer than its ttl), another one
        # took the lock over and moved the alias to v3: what the taker writes, by hand.
        held = json.loads(client.get_registered_model(lock.lock_name(name)).tags[lock.TAG])
        taker = {**held, "token": "taker", "generation": held["generation"] + 1}
        client.set_registered_model_tag(lock.lock_name(name), lock.TAG, json.dumps(taker))
        set_alias(name, CHAMPION, v3)
        client.set_registered_model_tag(name, lock.GENERATION_TAG, str(taker["generation"]))
        return GateDecision(True, [f"PASS: better than {current.version}"]), None

    outcome = move_gated(name, v2, stall_then_promote, lock_ttl_s=60)
    assert not outcome.promoted
    assert any("FAIL" in r and "taken over" in r for r in outcome.decision.reasons), outcome
    assert str(alias_version(name, CHAMPION).version) == v3  # the taker's move stands
