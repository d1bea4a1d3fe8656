"""Concurrent promotions against a real ``mlflow server`` behind an added-latency proxy.

Regression test of "two promotions racing put champion on the WORSE version" (issue 12): 50
trials, each a registered model whose champion v1 (FNMR 0.10) is challenged at once by v2
(0.08) and v3 (0.05) from two processes, under a zero-tolerance gate. By hand: v3 passes
against v1 and v2, v2 passes against v1 only, so every trial must end on v3, every move must be
from the version the alias held at that moment, and no two moves may start from the same
champion. (The old read-then-write promotion ends on v2 in a share of the trials:
``tests/faults/promotion_race.py --mode unlocked``.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from latency_proxy import LatencyProxy
from mlflow_fixtures import MlflowServer, mlflow_server  # noqa: F401 - fixture
from promotion_race import KEY, champions, race, setup_trials

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]


def _check(results: list[dict], names: list[str], uri: str) -> Counter:
    from mlflow import MlflowClient

    assert [r for r in results if "error" in r] == []
    assert len(results) == 2 * len(names)
    ends = champions(uri, names)
    assert {n: v for n, v in ends.items() if v != "3"} == {}
    orders: Counter = Counter()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name in names:
        mine = {r["version"]: r for r in results if r["model"] == name}
        v2, v3 = mine["2"], mine["3"]
        assert v3["promoted"], v3
        moves = [r["before"] for r in (v2, v3) if r["promoted"]]
        assert len(moves) == len(set(moves)), (name, v2, v3)  # never two moves from one champion
        if v2["promoted"]:  # v2 went first (from v1), then v3 beat v2
            assert (v2["before"], v3["before"]) == ("1", "2"), (name, v2, v3)
            orders["v2 then v3"] += 1
        else:  # v3 went first; v2 was judged against v3 and refused
            assert v3["before"] == "1" and v2["before"] == "3", (name, v2, v3)
            assert any(r.startswith("FAIL") for r in v2["reasons"]), v2
            orders["v3 first, v2 refused"] += 1
        tags = client.get_model_version(name, "3").tags
        assert tags["gate.champion_version"] == v3["before"] and tags["gate.promote"] == "true"
        assert float(tags[KEY]) == 0.05
    return orders


def test_fifty_concurrent_promotions_never_end_on_the_worse_version(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    names = setup_trials(mlflow_server.uri, "race", 50)
    port = int(mlflow_server.uri.rsplit(":", 1)[1])
    with LatencyProxy(port, 0.05) as proxy:
        results = race(proxy.url, names, tmp_path, "locked", jitter_ms=200, concurrency=10)
        assert proxy.connections > 0
    orders = _check(results, names, mlflow_server.uri)
    print(f"50 trials: {dict(orders)}")
    assert sum(orders.values()) == 50


@pytest.mark.faults_long
def test_concurrent_promotions_with_150ms_latency_long(mlflow_server, tmp_path: Path) -> None:  # noqa: F811
    names = setup_trials(mlflow_server.uri, "race-long", 100)
    port = int(mlflow_server.uri.rsplit(":", 1)[1])
    with LatencyProxy(port, 0.15) as proxy:
        results = race(proxy.url, names, tmp_path, "locked", jitter_ms=400, concurrency=20)
    orders = _check(results, names, mlflow_server.uri)
    print(f"100 trials at 150 ms: {dict(orders)}")
