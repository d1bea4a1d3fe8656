"""Property-based tests (hypothesis) of the calibration's public invariants.

- Cutting the pairs into any number of shards and blocks, and shuffling them, changes neither
  alpha, beta nor the operating thresholds, and the result equals the plain oracle
  (``oracle.py``, nothing from ``qmag_ray``).
- The impostor order statistics found by histogram passes over shards merged in any order
  are exactly those of the full sort, whatever the order of the pairs, the cut and the budget.

Examples are few and small (no Ray), deterministic (``derandomize``) and without deadline.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import oracle_fit

from qmag_ray.calibration.fit import fit_pairs
from qmag_ray.calibration.orderstats import (
    PassPlan,
    PassResult,
    ScoreRows,
    empty_result,
    merge_into,
    order_statistics,
    scan_blocks,
)
from qmag_ray.calibration.result import CalibrationGrid
from qmag_ray.pairs.source import ArrayPairSource

FAST = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
GRID = dict(n_fmr=6, fmr_min=0.01, fmr_max=0.1, n_weights=5, max_ratio=0.5)


def pairs(seed: int, n: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quality-dependent genuine and impostor scores; ``decimals`` rounds them (ties)."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.25).astype(np.int8)
    label[:2] = (0, 1)
    q = rng.uniform(5.0, 30.0, n)
    z = (q - 17.5) / 7.0
    cos = np.where(
        label == 1, rng.normal(0.5, 0.2, n) + 0.08 * z, rng.normal(0.0, 0.12, n) - 0.03 * z
    )
    cos = np.clip(cos, -1.0, 1.0)
    if decimals is not None:
        cos, q = np.round(cos, decimals), np.round(q)
    return cos, q, label


def fit_or_error(source: ArrayPairSource, method: str):
    try:
        cal = fit_pairs(source, CalibrationGrid(**GRID), method=method)
    except ValueError as exc:  # ill-posed data: the same error whatever the cut
        return ("error", str(exc))
    return (cal.alpha, cal.beta, cal.optimal_thresholds, cal.thresholds)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(400, 3_000),
    decimals=st.sampled_from([None, 3, 2]),
    shards=st.integers(2, 9),
    block=st.integers(1, 700),
    method=st.sampled_from(["paper", "raw"]),
)
def test_shards_blocks_and_pair_order_do_not_change_the_fit(
    seed: int, n: int, decimals: int | None, shards: int, block: int, method: str
) -> None:
    cos, q, y = pairs(seed, n, decimals)
    whole = fit_or_error(ArrayPairSource(cos, q, y), method)
    cut = fit_or_error(ArrayPairSource(cos, q, y, shards=shards, block_size=block), method)
    order = np.random.default_rng(seed + 1).permutation(n)
    shuffled = fit_or_error(
        ArrayPairSource(cos[order], q[order], y[order], shards=shards, block_size=block), method
    )
    assert cut == whole
    assert shuffled == whole
    if whole[0] == "error":
        return
    want = oracle_fit(cos, q, y, raw=method == "raw", **GRID)
    assert whole[0] == pytest.approx(want["alpha"], abs=1e-9)
    assert whole[1] == pytest.approx(want["beta"], abs=1e-9)
    assert whole[2] == want["optimal_thresholds"].tolist()


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 4_000),
    shards=st.integers(1, 8),
    block=st.integers(1, 1_000),
    decimals=st.sampled_from([None, 1, 2]),
    budget=st.sampled_from(
        [{}, {"hist_cells": 64, "collect_values": 16}, {"hist_cells": 16, "collect_values": 0}]
    ),
    n_ranks=st.integers(1, 12),
)
def test_merged_shard_passes_give_the_order_statistics_of_the_full_sort(
    seed: int, n: int, shards: int, block: int, decimals: int | None, budget: dict, n_ranks: int
) -> None:
    rng = np.random.default_rng(seed)
    cos = rng.normal(0.0, 0.3, n)
    q = rng.uniform(1.0, 20.0, n)
    if decimals is not None:  # many ties
        cos, q = np.round(cos, decimals), np.round(q)
    y = (rng.random(n) < 0.2).astype(np.int8)
    y[0] = 0
    imp = y == 0
    n_imp = int(imp.sum())
    weights = np.array([-0.02, 0.0, 0.015])
    ranks = np.unique(rng.integers(1, n_imp + 1, n_ranks))
    order = rng.permutation(n)
    source = ArrayPairSource(cos[order], q[order], y[order], shards=shards, block_size=block)
    shard_order = rng.permutation(source.num_shards())

    def run_pass(plan: PassPlan) -> PassResult:
        total = empty_result(plan)
        for index in shard_order:  # shards arrive in any order
            merge_into(total, scan_blocks(source.shard_blocks(int(index)), plan))
        return total

    rows = ScoreRows("logit", weights, float(q.max()))
    got = order_statistics(run_pass, rows, ranks, n_imp, **budget)
    for r, w in enumerate(weights):
        desc = np.sort(w * q[imp] + cos[imp])[::-1]  # the whole sort, plainly
        np.testing.assert_array_equal(got.values[r], desc[ranks - 1])
    np.testing.assert_array_equal(np.sort(got.first.genuine_cosine), np.sort(cos[~imp]))
    np.testing.assert_array_equal(np.sort(got.first.genuine_quality), np.sort(q[~imp]))
