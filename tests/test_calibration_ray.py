"""Calibration on Ray: the result does not depend on the number of shards and equals numpy's."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_calibration import synthetic

from qmag_ray import fit_qmagface
from qmag_ray.calibration.result import CalibrationGrid
from qmag_ray.pairs.source import ArrayPairSource

pytestmark = pytest.mark.ray


def test_ray_result_is_independent_of_shards_and_equals_numpy(
    ray_cluster: None, caplog: pytest.LogCaptureFixture
) -> None:
    from qmag_ray.calibration.distributed import RayExecutor
    from qmag_ray.calibration.fit import fit_pairs

    cos, q, y = synthetic(n=150_000, seed=21, decimals=3)
    grid = CalibrationGrid(fmr_min=1e-4, n_fmr=30)
    local = fit_qmagface(cos, q, y, grid=grid)
    results = {}
    # per-shard progress is DEBUG (shown with --verbose)
    with caplog.at_level(logging.DEBUG, logger="qmag_ray.calibration.distributed"):
        for shards in (1, 3, 7):
            # Small blocks: every shard streams several blocks through each pass.
            source = ArrayPairSource(cos, q, y, shards=shards, block_size=9_973)
            results[shards] = fit_pairs(source, executor=RayExecutor(source), grid=grid)
    assert "pass 1 shard 7/7 done" in caplog.text
    for shards, cal in results.items():
        assert (cal.alpha, cal.beta) == (local.alpha, local.beta), shards
        assert cal.optimal_thresholds == local.optimal_thresholds
        assert cal.fnmr_table == local.fnmr_table
        assert cal.thresholds == local.thresholds and len(cal.thresholds) == 4
        assert cal.fingerprint == local.fingerprint
        assert cal.extra["executor"] == "ray" and cal.extra["shards"] == shards
    assert np.isfinite([local.alpha, local.beta]).all()
