"""The torch path of the histogram passes (GPU actors; here torch on the CPU) equals numpy's."""

from __future__ import annotations

import numpy as np
import pytest
from test_exhaustive import labelled

from qmag_ray.calibration.device import DeviceExecutor, DeviceScanner, RayDeviceExecutor
from qmag_ray.calibration.fit import LocalExecutor, fit_pairs
from qmag_ray.calibration.orderstats import (
    PassPlan,
    PassResult,
    ScoreRows,
    first_plan,
    merge_into,
    order_statistics,
    scan_blocks,
)
from qmag_ray.calibration.result import CalibrationGrid
from qmag_ray.pairs.exhaustive import ExhaustiveSource

GRID = CalibrationGrid(n_fmr=12, fmr_min=1e-4, n_weights=9)


def source(shards: int = 3) -> ExhaustiveSource:
    # 600 faces, 40 identities: 179,700 pairs in tiles of 128 (several diagonal strips).
    return ExhaustiveSource(labelled(600, n_ident=40, seed=2), block_size=128, shards=shards)


def _same(a: PassResult, b: PassResult) -> None:
    np.testing.assert_array_equal(a.hist, b.hist)
    assert a.n_impostor == b.n_impostor
    for x, y in zip(a.collected, b.collected, strict=True):
        np.testing.assert_array_equal(np.sort(x), np.sort(y))
    np.testing.assert_array_equal(np.sort(a.genuine_cosine), np.sort(b.genuine_cosine))


@pytest.mark.parametrize("kind", ["logit", "qmagface"])
def test_every_pass_equals_numpy(kind: str) -> None:
    """Pass 1 and each refinement pass (histograms and collections) give the same counts."""
    src = source()
    params = np.linspace(-0.02, 0.02, 5) if kind == "logit" else np.array([[0.05, 0.1], [0, 0]])
    rows = ScoreRows(kind, params, src.max_quality())
    scanner = DeviceScanner(src, "cpu")
    plans: list[PassPlan] = []

    def both(plan: PassPlan) -> PassResult:
        plans.append(plan)
        want = scan_blocks((b for i in range(3) for b in src.shard_blocks(i)), plan)
        got = [scanner.scan(i, plan) for i in range(3)]
        for part in got[1:]:
            merge_into(got[0], part)
        _same(got[0], want)
        return want

    ranks = np.array([1, 2, 10, 150, 1_000, 9_000])
    order_statistics(both, rows, ranks, src.counts()[1], hist_cells=256, collect_values=64)
    assert len(plans) > 2 and not plans[-1].first  # refinement passes were compared too


def test_calibration_on_torch_equals_numpy_bit_for_bit() -> None:
    src = source()
    want = fit_pairs(src, GRID, executor=LocalExecutor(src))
    got = fit_pairs(src, GRID, executor=DeviceExecutor(src, "cpu"))
    assert (got.alpha, got.beta) == (want.alpha, want.beta)
    assert got.optimal_thresholds == want.optimal_thresholds
    assert got.fnmr_table == want.fnmr_table and got.thresholds == want.thresholds
    assert got.extra["executor"] == "torch"


def test_a_device_whose_products_differ_is_refused() -> None:
    src = source(1)
    scanner = DeviceScanner(src, "cpu")
    scanner.unit = scanner.unit * (1 + 2**-20)  # as if the device rounded differently
    with pytest.raises(RuntimeError, match="differs from numpy's on tile"):
        scanner.scan(0, first_plan(ScoreRows("logit", np.zeros(1), 1.0), genuine=False))


@pytest.mark.ray
def test_ray_device_actors_equal_numpy(ray_cluster: None) -> None:
    src = source()
    want = fit_pairs(src, GRID, executor=LocalExecutor(src))
    got = fit_pairs(src, GRID, executor=RayDeviceExecutor(src, "cpu", actors=2))
    assert (got.alpha, got.beta, got.thresholds) == (want.alpha, want.beta, want.thresholds)
