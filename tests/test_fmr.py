"""The FMR primitives shared by metrics, calibration, the guard and the gate (worked by hand)."""

from __future__ import annotations

import numpy as np

from qmag_ray.fmr import (
    allowed_excess,
    fmr_key,
    impostor_counts,
    measurable,
    operating_points,
    supported_fmrs,
    thresholds_at_bounds,
)
from qmag_ray.tracking.gate import GateConfig, decide
from qmag_ray.validation import FmrRow, check_guard


def test_measurable_counts_false_matches() -> None:
    # 1e-3 of 1,000 impostors is exactly one false match; of 999 it is 0.999.
    assert measurable(1e-3, 1000) and not measurable(1e-3, 999)
    assert measurable(1e-3, 10_000, min_false_matches=10)
    assert not measurable(1e-3, 9_999, min_false_matches=10)
    assert supported_fmrs((1e-2, 1e-3, 1e-4), 1000) == [1e-2, 1e-3]
    assert fmr_key(1e-3) == "1e-03" and fmr_key(0.01) == "1e-02"


def test_tolerance_rule_is_the_larger_allowance() -> None:
    assert allowed_excess(0.10, 0.0005, 0.05) == 0.05 * 0.10  # relative wins: 5% of 10%
    assert allowed_excess(0.004, 0.0005, 0.05) == 0.0005  # absolute wins: 5% of 0.4% is less


def test_guard_and_gate_apply_the_same_rule() -> None:
    # cosine / champion FNMR 0.10; 0.104 is within max(0.0005, 0.05 * 0.10) = 0.005, 0.106 not.
    rows = [FmrRow(fmr=1e-2, target=True, cosine_fnmr=0.10, qmagface_fnmr=0.104)]
    assert check_guard(rows, 10_000, tolerance=0.05, abs_tolerance=0.0005).passed is True
    rows = [FmrRow(fmr=1e-2, target=True, cosine_fnmr=0.10, qmagface_fnmr=0.106)]
    assert check_guard(rows, 10_000, tolerance=0.05, abs_tolerance=0.0005).passed is False
    gate = GateConfig(target_fmr=1e-2, max_fnmr_increase=0.0005, max_fnmr_increase_relative=0.05)
    key = gate.fnmr_metric
    assert decide({key: 0.104}, {key: 0.10}, gate).promote
    assert not decide({key: 0.106}, {key: 0.10}, gate).promote


def test_operating_points_by_hand() -> None:
    # impostors 0.9 > 0.5 > 0.3 > 0.1 (N=4); genuine 0.95, 0.6, 0.4. At FMR <= 0.25 one
    # impostor may pass: the threshold must exceed 0.5 -> 0.6, accepting 2 genuine pairs.
    thr, acc = operating_points(
        np.array([0.95, 0.6, 0.4]),
        np.array([0.9, 0.5, 0.3, 0.1]),
        4,
        np.array([0.25]),
        strict=False,
    )
    assert thr.tolist() == [0.6] and acc.tolist() == [2]


def test_measurable_allows_a_rounding_below_the_count() -> None:
    # f * N that a rounding puts just under the count still measures it (1e-9 of slack), and
    # one exactly at the slack's edge is in: ``>=``, not ``>``.
    assert measurable(10 - 1e-9, 1, min_false_matches=10)
    assert not measurable(10 - 2e-9, 1, min_false_matches=10)


def test_impostor_counts_settle_floor_roundings_and_the_ends() -> None:
    # 0.29 * 100 is 28.999999999999996 in floats, but 29 / 100 == 0.29: at most f passes 29.
    assert impostor_counts(100, np.array([0.29]), strict=False).tolist() == [29]
    assert impostor_counts(100, np.array([0.29]), strict=True).tolist() == [28]  # 29/100 !< f
    # FMR 1 (at most): every impostor may pass, and no more than there are.
    assert impostor_counts(10, np.array([1.0]), strict=False).tolist() == [10]
    # FMR 0 (below): no count's rate is below 0; the result stays in 0..N.
    assert impostor_counts(10, np.array([0.0]), strict=True).tolist() == [0]


def test_thresholds_at_bounds_count_accepted_pairs_as_integers() -> None:
    thr, acc = thresholds_at_bounds(np.array([0.2, 0.5, 0.9]), np.array([0.4, 0.1]), 0.6)
    # Bound 0.4: 0.5 and 0.9 accepted, the threshold is the smallest of them; bound 0.1: all.
    assert thr.tolist() == [0.5, 0.2] and acc.tolist() == [2, 3]
    assert acc.dtype.kind == "i" and thr.dtype == np.float64
