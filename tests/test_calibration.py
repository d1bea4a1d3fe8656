"""Calibration (spec section 3): parity with the published algorithm, a case on paper, errors."""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import pytest
from oracle import oracle_fit

from qmag_ray import fit_qmagface
from qmag_ray.calibration.fit import fit_pairs
from qmag_ray.calibration.orderstats import (
    Collector,
    PassPlan,
    PassResult,
    ScoreRows,
    empty_result,
    first_plan,
    merge_into,
    order_statistics,
    scan_blocks,
)
from qmag_ray.calibration.result import CalibrationGrid, QMagFaceCalibration
from qmag_ray.calibration.search import operating_points, sigmoid
from qmag_ray.pairs.source import ArrayPairSource, PairBlock


def synthetic(
    n: int,
    seed: int,
    *,
    genuine_share: float = 0.1,
    decimals: int | None = None,
    quality: str = "uniform",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine, pair quality and label with quality-dependent genuine and impostor scores."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < genuine_share).astype(np.int8)
    # "lognormal": a long-tailed spread, as real pair qualities have.
    q = rng.uniform(12.0, 35.0, n) if quality == "uniform" else rng.lognormal(3.0, 0.5, n)
    z = (q - q.mean()) / q.std()
    cos = np.where(
        label == 1,
        rng.normal(0.55, 0.15, n) + 0.06 * z,
        rng.normal(0.0, 0.09, n) - 0.02 * z,
    )
    cos = np.clip(cos, -1.0, 1.0)
    if decimals is not None:
        cos = np.round(cos, decimals)
        q = np.round(q)
    return cos, q, label


PARITY_CASES = {
    "continuous-paper-grid": (dict(n=250_000, seed=1), {}),
    "heavy-ties": (
        dict(n=60_000, seed=2, decimals=2),
        dict(n_fmr=20, fmr_min=1e-3, fmr_max=5e-2, n_weights=9),
    ),
    "quality-spread": (
        dict(n=40_000, seed=3, quality="lognormal"),
        dict(n_fmr=11, fmr_min=2e-4, fmr_max=1e-2, n_weights=7, max_ratio=0.8),
    ),
    "few-genuine": (
        dict(n=80_000, seed=4, genuine_share=0.004, decimals=3),
        dict(n_fmr=15, fmr_min=1e-4, fmr_max=2e-2, n_weights=12),
    ),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_with_the_published_algorithm(case: str) -> None:
    data_kw, grid_kw = PARITY_CASES[case]
    cos, q, y = synthetic(**data_kw)
    got = fit_qmagface(cos, q, y, **grid_kw)
    want = oracle_fit(cos, q, y, **grid_kw)
    assert got.alpha == pytest.approx(want["alpha"], abs=1e-9)
    assert got.beta == pytest.approx(want["beta"], abs=1e-9)
    np.testing.assert_array_equal(got.weights, want["weights"])
    np.testing.assert_array_equal(got.fmrs, want["fmrs"])
    np.testing.assert_array_equal(got.optimal_weights, want["optimal_weights"])
    np.testing.assert_array_equal(got.optimal_thresholds, want["optimal_thresholds"])
    np.testing.assert_allclose(got.fnmr_table, want["fnmr_table"], rtol=0, atol=1e-12)
    assert (got.n_genuine, got.n_impostor) == (int(y.sum()), int((y == 0).sum()))
    # The fit is not degenerate: the optimal weight really changes along the FMR range.
    assert len(set(got.optimal_weights)) > 1


def test_parity_with_scikit_learn_default_roc_simplification() -> None:
    """The original code's ROC drops collinear points; without exact ties nothing changes."""
    cos, q, y = synthetic(n=120_000, seed=5)
    got = fit_qmagface(cos, q, y, fmr_min=1e-4)
    want = oracle_fit(cos, q, y, fmr_min=1e-4, drop_intermediate=True)
    assert (got.alpha, got.beta) == pytest.approx((want["alpha"], want["beta"]), abs=1e-9)


# --- a case small enough to follow on paper --------------------------------------------------
# Weights are -0.5 and +0.5 (max quality 1, max_ratio 0.5); FMRs 0.15 and 0.35 on 10
# impostors, so a threshold may pass at most 1 impostor (FMR 0.1 < 0.15) or 3 (0.3 < 0.35).
# Logits x = w * q + s (the sigmoid keeps their order):
#             I1    I2    I3    I4   I5-10 |  G1    G2    G3    G4
#   s        .40   .40   .30   .05   -.50  | .60   .35   .45   .20
#   q          0     1     0     1      0  |   0     1     0     1
#   w = -.5  .40  -.10   .30  -.45   -.50  | .60  -.15   .45  -.30
#   w = +.5  .40   .90   .30   .55   -.50  | .60   .85   .45   .70
# w=-.5, f=.15: bound = 2nd impostor .30 -> G1, G3 accepted, FNMR 2/4. Thresholds .40 (an
#   impostor) and .45 tie on FNMR; the highest wins: t = sigmoid(.45).
# w=-.5, f=.35: bound = 4th impostor -.45 -> all accepted, FNMR 0, t = sigmoid(-.30).
# w=+.5, f=.15: bound .55 -> G1, G2, G4 accepted, FNMR 1/4, t = sigmoid(.60).
# w=+.5, f=.35: bound .30 -> all accepted, FNMR 0, t = sigmoid(.45) (.40 ties, lower).
# Optimal: f=.15 -> w=+.5 (1/4 < 2/4), t = sigmoid(.6); f=.35 -> tie at 0, first weight -.5,
# t = sigmoid(-.3). Line through both points: beta = 1 / (sigmoid(.6) - sigmoid(-.3)),
# alpha = beta * sigmoid(.6) - .5.
TINY_COS = np.array([0.40, 0.40, 0.30, 0.05] + [-0.5] * 6 + [0.60, 0.35, 0.45, 0.20])
TINY_Q = np.array([0, 1, 0, 1] + [0] * 6 + [0, 1, 0, 1], dtype=float)
TINY_Y = np.array([0] * 10 + [1] * 4)
TINY_GRID = dict(n_fmr=2, fmr_min=0.15, fmr_max=0.35, n_weights=2, max_ratio=0.5)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_tiny_case_worked_by_hand() -> None:
    got = fit_qmagface(TINY_COS, TINY_Q, TINY_Y, **TINY_GRID)
    assert got.weights == [-0.5, 0.5]
    assert got.fmrs == pytest.approx([0.15, 0.35])
    assert got.fnmr_table == [[0.5, 0.0], [0.25, 0.0]]
    assert got.optimal_weights == [0.5, -0.5]
    assert got.optimal_thresholds == pytest.approx([_sig(0.6), _sig(-0.3)], rel=1e-12)
    beta = 1.0 / (_sig(0.6) - _sig(-0.3))
    assert got.beta == pytest.approx(beta, rel=1e-12)
    assert got.alpha == pytest.approx(beta * _sig(0.6) - 0.5, rel=1e-12)
    assert got.beta == pytest.approx(4.5434, abs=1e-4)
    want = oracle_fit(TINY_COS, TINY_Q, TINY_Y, **TINY_GRID)
    assert (got.alpha, got.beta) == (want["alpha"], want["beta"])
    # Ten impostors cannot measure FMR 1e-2 or below: no operating thresholds are claimed.
    assert got.thresholds == {}


def test_operating_points_follow_iso_and_strict_conventions() -> None:
    # Impostors 5 > 4 > 3 > 2 > 1 (N=5), genuine 2.5, 3.5, 6. Match iff score >= t.
    imp = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    gen = np.array([6.0, 2.5, 3.5])
    fmrs = np.array([0.2, 0.4, 0.1])
    thr, acc = operating_points(gen, imp, 5, fmrs, strict=False)
    # FMR <= 0.2 lets one impostor pass: t > 4 -> t = 6 (only genuine above 4), 1 accepted.
    # FMR <= 0.4: t > 3 -> smallest genuine above 3 is 3.5, 2 accepted.
    # FMR <= 0.1: no impostor may pass: t > 5 -> 6.
    np.testing.assert_array_equal(thr, [6.0, 3.5, 6.0])
    np.testing.assert_array_equal(acc, [1, 2, 1])
    thr, acc = operating_points(gen, imp, 5, fmrs, strict=True)
    # FMR < 0.2 passes no impostor (t > 5); FMR < 0.4 passes one (t > 4).
    np.testing.assert_array_equal(thr, [6.0, 6.0, 6.0])
    np.testing.assert_array_equal(acc, [1, 1, 1])
    # No genuine above the bound: FNMR 1 at the highest score, or NaN when nothing is admissible.
    thr, acc = operating_points(np.array([0.5]), imp, 5, np.array([0.2, 0.1]), strict=False)
    assert thr[0] == 5.0 and math.isnan(thr[1]) and list(acc) == [0, 0]


def _ranked(values: np.ndarray, ranks: np.ndarray, shards: int = 1, **budget: int) -> object:
    """Order statistics of ``values`` (one "logit" row of weight 0: the values themselves) by
    the histogram passes, with ``shards`` shard results merged in reverse order."""
    cos = np.asarray(values, np.float64)
    source = ArrayPairSource(cos, np.zeros(len(cos)), np.zeros(len(cos), np.int8), shards=shards)
    rows = ScoreRows("logit", np.array([0.0]), 1.0)

    def run_pass(plan: PassPlan) -> PassResult:
        total = empty_result(plan)
        for index in reversed(range(source.num_shards())):
            merge_into(total, scan_blocks(source.shard_blocks(index), plan))
        return total

    return order_statistics(run_pass, rows, ranks, len(cos), **budget)


@pytest.mark.parametrize(
    "budget",
    [{}, {"hist_cells": 64, "collect_values": 16}, {"hist_cells": 16, "collect_values": 0}],
    ids=["default", "small", "histogram-only"],
)
def test_order_statistics_equal_a_full_sort(budget: dict[str, int]) -> None:
    """Exact ranks on ties, a spike of one repeated value, +-0.0 and values far outside the
    first pass's range, with budgets that force many refinement passes down to single floats."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            np.round(rng.normal(size=200_000), 2),  # many ties
            np.full(5_000, 0.125),  # one value, many times
            np.array([0.0, -0.0, 7.5, -9.0, 1e-300, -1e-300]),
            rng.normal(0.3, 1e-9, 1_000),  # values closer than the histogram bins
        ]
    )
    rng.shuffle(x)
    desc = np.sort(x)[::-1]
    ranks = np.unique(np.r_[1, 2, 3, 17, 100, 4_000, 5_000, 12_345, 60_000, len(x)])
    for shards in (1, 3):
        got = _ranked(x, ranks, shards=shards, **budget)
        np.testing.assert_array_equal(got.values[0], desc[ranks - 1])
    if budget:
        assert got.passes > 3  # the small budgets really refine


def test_order_statistics_refuse_scores_that_change_between_passes() -> None:
    calls = []
    cos = np.random.default_rng(1).normal(size=10_000)
    rows = ScoreRows("logit", np.array([0.0]), 1.0)

    def run_pass(plan: PassPlan) -> PassResult:
        calls.append(plan)
        shift = 1e-3 * (len(calls) > 1)  # a second pass sees different scores
        source = ArrayPairSource(cos + shift, np.zeros(len(cos)), np.zeros(len(cos), np.int8))
        return scan_blocks(source.shard_blocks(0), plan)

    with pytest.raises(RuntimeError, match="scores changed between passes"):
        order_statistics(run_pass, rows, np.array([1, 50]), len(cos))


def test_order_statistics_stop_at_the_pass_limit() -> None:
    """With one-cell histograms and nothing collected, each pass narrows an interval by the
    minimum of 4 bits: 64-bit float keys then need 1 + 64 / 4 = 17 passes. A limit of 17 is
    enough; 16 stops with an error instead of running on."""
    x = np.array([5e-324, 1.7e308, -1.7e308, 0.0, 1.0, -5e-324, 2.0**-1000])
    ranks = np.arange(1, 8)
    got = _ranked(x, ranks, hist_cells=1, collect_values=0, max_passes=17)
    np.testing.assert_array_equal(got.values[0], np.sort(x)[::-1])
    assert got.passes == 17
    with pytest.raises(RuntimeError, match="not resolved after 16 passes .*limit is 16"):
        _ranked(x, ranks, hist_cells=1, collect_values=0, max_passes=16)


def test_sigmoid_is_one_formula() -> None:
    x = np.linspace(-3, 3, 7)
    np.testing.assert_array_equal(sigmoid(x), 1.0 / (1.0 + np.exp(-x)))
    assert sigmoid(np.array([0.0]))[0] == 0.5


# --- ill-posed input -------------------------------------------------------------------------
def test_no_genuine_or_no_impostor_pairs_is_an_error() -> None:
    cos, q, _ = synthetic(n=1_000, seed=6)
    with pytest.raises(ValueError, match="needs genuine pairs"):
        fit_qmagface(cos, q, np.zeros(1_000, int), fmr_min=1e-2, fmr_max=0.1)
    with pytest.raises(ValueError, match="needs impostor pairs"):
        fit_qmagface(cos, q, np.ones(1_000, int), fmr_min=1e-2, fmr_max=0.1)


def test_a_given_fmr_min_too_small_for_the_data_names_the_flags() -> None:
    cos, q, y = synthetic(n=20_000, seed=7)
    n_imp = int((y == 0).sum())
    with pytest.raises(ValueError) as err:
        fit_qmagface(cos, q, y, fmr_min=1e-5)
    msg = str(err.value)
    assert f"--fmr-min (grid.fmr_min) 1e-05 cannot be measured on {n_imp} impostor" in msg
    assert f"1/N = {1 / n_imp:.3g}" in msg and "--impostors-per-side" in msg


def test_the_default_floor_is_raised_to_what_the_impostors_measure() -> None:
    cos, q, y = synthetic(n=20_000, seed=7)
    n_imp = int((y == 0).sum())
    # Worked by hand: the smallest 3-significant-digit FMR with FMR * n_imp >= 1.
    floor = min(
        m * 10.0**e
        for e in range(-8, 0)
        for m in np.arange(100, 1000) / 100
        if m * 10.0**e * n_imp >= 1
    )
    cal = fit_qmagface(cos, q, y)
    assert cal.grid.fmr_min == pytest.approx(floor, rel=1e-9)
    assert cal.fmrs[0] == pytest.approx(floor, rel=1e-9) and floor * n_imp >= 1
    assert cal.extra["grid_note"] == (
        f"grid FMR floor raised from 1e-05 to {floor:.3g}: {n_imp} impostor pairs measure no "
        "smaller FMR (--fmr-min sets it; --impostors-per-side gives more impostors)"
    )
    saved = type(cal).from_dict(cal.to_dict())
    assert saved.grid == cal.grid and saved.extra["grid_note"] == cal.extra["grid_note"]
    # Enough impostors for the paper's 1e-5: the grid is the paper's, with no note.
    assert "grid_note" not in fit_qmagface(cos, q, y, fmr_min=1e-3).extra


def test_fmr_without_any_threshold_is_an_error() -> None:
    # 100 impostors, FMR 0.01: no impostor may pass, yet one impostor outscores every genuine
    # pair at every weight (all qualities equal), so no threshold accepts a genuine pair.
    cos = np.r_[np.linspace(-0.5, 0.3, 99), 0.99, np.linspace(0.4, 0.9, 20)]
    y = np.r_[np.zeros(100, int), np.ones(20, int)]
    with pytest.raises(ValueError, match="no threshold exists for FMR 0.01"):
        fit_qmagface(cos, np.ones(120), y, n_fmr=3, fmr_min=0.01, fmr_max=0.1)


def test_bad_values_and_conflicting_arguments_are_errors() -> None:
    cos, q, y = synthetic(n=1_000, seed=8)
    bad = cos.copy()
    bad[17] = np.nan
    with pytest.raises(ValueError, match="cosine has 1 non-finite value.*index 17"):
        fit_qmagface(bad, q, y)
    with pytest.raises(ValueError, match="either grid"):
        fit_qmagface(cos, q, y, n_fmr=5, grid=CalibrationGrid())
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_pairs(ArrayPairSource(cos, q, y), method="raw-score")


def test_equal_optimal_thresholds_cannot_define_a_line() -> None:
    # One genuine pair far above every impostor: every (weight, FMR) picks its score.
    cos = np.r_[np.linspace(-0.5, 0.0, 50), 0.9]
    y = np.r_[np.zeros(50, int), 1]
    q = np.ones(51)
    with pytest.raises(ValueError, match="optimal thresholds are equal"):
        fit_qmagface(cos, q, y, n_fmr=3, fmr_min=0.05, fmr_max=0.2, n_weights=3)


# --- result object ---------------------------------------------------------------------------
def test_result_is_complete_and_round_trips_through_json(tmp_path) -> None:
    cos, q, y = synthetic(n=150_000, seed=9)
    cal = fit_qmagface(cos, q, y)
    assert len(cal.fnmr_table) == 20 and len(cal.fnmr_table[0]) == 50
    assert cal.fingerprint == ArrayPairSource(cos, q, y).fingerprint()
    assert set(cal.thresholds) == {"1e-02", "1e-03", "1e-04", "1e-05"}
    # The operating thresholds are ISO thresholds of the QMagFace score on these pairs.
    scores = cal.score(cos, q)
    imp, gen = scores[y == 0], scores[y == 1]
    for key, thr in cal.thresholds.items():
        assert np.mean(imp >= thr) <= float(key)
        assert cal.extra["operating_fnmr"][key] == pytest.approx(np.mean(gen < thr), abs=1e-15)
    path = tmp_path / "out" / "calibration.json"
    cal.save(str(path))
    back = QMagFaceCalibration.from_file(str(path))
    assert back == cal
    assert back.threshold_at(1e-3) == cal.thresholds["1e-03"]


def test_shards_and_blocks_do_not_change_the_result_in_process() -> None:
    cos, q, y = synthetic(n=120_000, seed=10, decimals=3)
    grid = CalibrationGrid(fmr_min=1e-4)
    one = fit_pairs(ArrayPairSource(cos, q, y), grid)
    many = fit_pairs(ArrayPairSource(cos, q, y, shards=6, block_size=7_001), grid)
    assert (many.alpha, many.beta) == (one.alpha, one.beta)
    assert many.fnmr_table == one.fnmr_table and many.thresholds == one.thresholds
    assert many.extra["shards"] == 6


def test_shard_pass_results_merge_to_the_result_of_all_pairs() -> None:
    cos, q, y = synthetic(n=50_000, seed=11, decimals=2)
    source = ArrayPairSource(cos, q, y, shards=5, block_size=3_001)
    rows = ScoreRows("logit", np.linspace(-0.02, 0.02, 4), float(q.max()))
    plan = first_plan(rows, genuine=True)
    whole = scan_blocks(ArrayPairSource(cos, q, y).shard_blocks(0), plan)
    merged = empty_result(plan)
    for index in (3, 0, 4, 1, 2):  # any order
        merge_into(merged, scan_blocks(source.shard_blocks(index), plan))
    assert merged.n_impostor == whole.n_impostor == int((y == 0).sum())
    np.testing.assert_array_equal(merged.hist, whole.hist)
    np.testing.assert_array_equal(np.sort(merged.genuine_cosine), np.sort(cos[y == 1]))


def test_pass_results_add_counts_and_join_values_of_one_plan_only() -> None:
    a = PassResult(np.zeros((2, 3), np.int64), [np.array([0.1])])
    b = PassResult(
        np.ones((2, 3), np.int64),
        [np.array([0.5, 0.2])],
        n_impostor=4,
        genuine_cosine=np.array([0.7]),
        genuine_quality=np.array([20.0]),
    )
    c = PassResult(np.full((2, 3), 2, np.int64), [np.empty(0)], n_impostor=1)  # no genuine
    assert merge_into(merge_into(a, b), c) is a
    np.testing.assert_array_equal(a.hist, np.full((2, 3), 3))
    np.testing.assert_array_equal(a.collected[0], [0.1, 0.5, 0.2])
    assert a.n_impostor == 5 and a.n_genuine == 1
    np.testing.assert_array_equal(a.genuine_cosine, [0.7])
    np.testing.assert_array_equal(a.genuine_quality, [20.0])
    # Another histogram shape, or another number of collected intervals: another plan.
    for other in (
        PassResult(np.zeros((2, 4), np.int64), [np.empty(0)]),
        PassResult(np.zeros((2, 3), np.int64), []),
    ):
        with pytest.raises(ValueError, match="^cannot merge results of different pass plans$"):
            merge_into(a, other)


def test_collector_fills_each_interval_within_its_count_in_arrival_order() -> None:
    # Four intervals, the second histogrammed (shift 3): three collect slots of 2, 0 and 3.
    rows = ScoreRows("logit", np.zeros(1), 1.0)
    plan = PassPlan(
        rows, first=False, shift=np.array([-1, 3, -1, -1]), count=np.array([2, 9, 0, 3])
    )
    got = Collector(plan)
    got.add(np.array([0.5, 0.1]), np.array([2, 0]))  # one block's values
    got.add(np.array([], float), np.array([], np.int64))  # a block with none
    got.add(np.array([0.7, 0.3, 0.2]), np.array([2, 0, 2]))
    slots = got.finish()
    assert [s.tolist() for s in slots] == [[0.1, 0.3], [], [0.5, 0.7, 0.2]]
    with pytest.raises(RuntimeError, match="scores changed between passes"):
        got.add(np.array([0.9]), np.array([0]))  # slot 0 held 2 values
    with pytest.raises(ValueError, match="needs their counts"):
        Collector(PassPlan(rows, first=False, shift=np.array([-1])))


# --- the search's steps one by one (values worked by hand) ----------------------------------


def test_wanted_ranks_and_rank_values() -> None:
    from qmag_ray.calibration.search import rank_values, wanted_ranks

    # 5 impostors; thresholds passing at most 2 or 5 (all) impostors: the 3rd highest decides
    # the first; "all may pass" needs no order statistic; rank 1 is the fallback.
    np.testing.assert_array_equal(wanted_ranks(np.array([2, 5]), 5), [1, 3])
    # 4 impostors with order statistics v1 = 0.9, v2 = 0.7, v4 = 0.1 at ranks 1, 2, 4; m = 1
    # and 3 take v2 and v4 as bounds, m = 4 (every impostor may pass) has bound -inf.
    bound, top = rank_values(np.array([0.9, 0.7, 0.1]), np.array([1, 2, 4]), [1, 3, 4], 4)
    assert bound.tolist() == [0.7, 0.1, -math.inf] and top == 0.9


def test_search_weight_on_the_sigmoid_and_on_the_raw_score() -> None:
    from qmag_ray.calibration.search import search_weight

    # w = 0.5: z = w * q + s = 0.5 * [1, 2] + [0.2, 0.4] = [0.7, 1.4]. Bounds (logits) 0.8 and
    # -inf (every impostor may pass), highest impostor logit 1.0. Raw: above 0.8 the smallest
    # genuine z is 1.4 (1 accepted); above -inf it is 0.7 (2 accepted).
    args = (0.5, np.array([0.8, -np.inf]), 1.0, np.array([0.2, 0.4]), np.array([1.0, 2.0]))
    t, acc = search_weight(*args, raw=True)
    assert t.tolist() == [1.4, 0.7] and acc.tolist() == [1, 2]
    # Default (the paper): the same on u = sigmoid(z), sigmoid monotone.
    t, acc = search_weight(*args)
    want = [1 / (1 + math.exp(-1.4)), 1 / (1 + math.exp(-0.7))]
    np.testing.assert_allclose(t, want, rtol=1e-15)
    assert acc.tolist() == [1, 2]


def test_hopeless_fmr_and_degenerate_lines_say_what_to_do() -> None:
    from qmag_ray.calibration.search import fit_line, select_optimal

    with pytest.raises(ValueError) as err:
        select_optimal(np.array([0.0, 1.0]), np.full((2, 1), np.nan), np.zeros((2, 1), int), 3,
                       np.array([1e-3]))  # fmt: skip
    assert str(err.value) == (
        "no threshold exists for FMR 0.001: at every candidate weight, each threshold with FMR "
        "below 0.001 rejects all 3 genuine pairs (too few impostor pairs above the genuine "
        "scores to measure it); raise --fmr-min (grid.fmr_min) above this FMR or give more "
        "impostor pairs (--impostors-per-side)"
    )
    with pytest.raises(ValueError, match=r"^cannot fit the line: some optimal thresholds are "
                       r"not finite$"):  # fmt: skip
        fit_line(np.array([0.1, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(
        ValueError,
        match=r"^cannot fit the line: all 3 optimal thresholds are "
        r"equal \(0\.5\); the data are too few or too coarse for this FMR range$",
    ):
        fit_line(np.array([0.5, 0.5, 0.5]), np.array([1.0, 2.0, 3.0]))


def test_float32_inputs_are_computed_in_float64() -> None:
    from qmag_ray.scores import qmagface_score

    x32 = np.array([0.1], np.float32)
    x = float(x32[0])  # 0.100000001490116...
    got = sigmoid(x32)
    assert got.dtype == np.float64 and got[0] == 1.0 / (1.0 + math.exp(-x))
    got = qmagface_score(x32, np.array([20.0]), 0.25, 0.5)
    assert got.dtype == np.float64 and got[0] == (0.5 * x - 0.25) * 20.0 + x
    buf = np.empty(1)
    assert qmagface_score(np.array([0.75]), np.array([20.0]), 0.25, 0.5, out=buf) is buf
    assert buf[0] == 0.75


def test_a_single_threshold_and_a_non_finite_line_are_errors() -> None:
    from qmag_ray.calibration.search import fit_line

    with pytest.raises(ValueError, match=r"^cannot fit the line: all 1 optimal thresholds are "
                       r"equal \(0\.5\);"):  # fmt: skip
        fit_line(np.array([0.5]), np.array([-0.01]))
    # Slope -2e308 overflows to -inf while the intercept (1e308, alpha -1e308 up to the
    # solver's rounding) stays finite: either one non-finite parameter is an error.
    message = r"^the line fit gave non-finite parameters \(alpha=-[0-9.]+e\+30[78], beta=-inf\)$"
    with np.errstate(all="ignore"), pytest.raises(ValueError, match=message):
        fit_line(np.array([0.0, 1.0]), np.array([1e308, -1e308]))


def _key(x: float) -> int:
    """Oracle: the order-preserving integer key of a float64 (sign-magnitude bits flipped to
    two's-complement order for negative values), from the IEEE 754 bit pattern."""
    (bits,) = struct.unpack("<q", struct.pack("<d", x))
    return bits if bits >= 0 else bits ^ 0x7FFFFFFFFFFFFFFF


def test_float_keys_order_the_floats_and_key_floats_inverts_them() -> None:
    from qmag_ray.calibration.orderstats import float_keys, key_floats

    x = [-math.inf, -1.5, -5e-324, -0.0, 0.0, 5e-324, 1.0, math.inf]
    # By hand: +0.0 is key 0, the smallest subnormal 1; -0.0 is -1, -5e-324 is -2.
    want = [_key(v) for v in x]
    assert want[2:6] == [-2, -1, 0, 1] and want == sorted(want)
    assert float_keys(np.array(x)).tolist() == want
    assert float_keys(np.array(x, np.float32)).tolist() == [
        _key(float(v)) for v in np.array(x, np.float32)
    ]
    assert float_keys([0, 1]).tolist() == [0, _key(1.0)]  # integers are keyed as floats
    back = key_floats(np.array(want))
    assert back.dtype == np.float64 and back.tolist() == x
    assert np.signbit(back).tolist() == [True] * 4 + [False] * 4  # -0.0 stays -0.0
    assert key_floats(np.array([1, 0], np.uint64)).tolist() == [5e-324, 0.0]


def test_first_bin_edges_are_the_smallest_floats_of_each_bin() -> None:
    """Oracle: the pass-1 bin ``floor(clip((x - lo) * scale, 0, B - 1))`` (module docstring)
    evaluated here; each edge ``E_b`` must be in bin >= b while the float just below it is not."""
    from qmag_ray.calibration.orderstats import first_bin_edges, key_floats

    rows = ScoreRows("logit", np.array([-0.2, 0.0, 0.3]), 2.0)
    plan = first_plan(rows, genuine=False, hist_cells=3 * 64)
    bins = plan.bins
    assert bins == 64

    def bin_of(x: float, r: int) -> int:
        with np.errstate(all="ignore"):
            v = (np.float64(x) - plan.lo[r]) * plan.scale[r]
        return int(min(max(v, 0.0), bins - 1))

    row = np.repeat(np.arange(3), bins + 1)
    b = np.tile(np.arange(bins + 1), 3)
    edges = first_bin_edges(plan, row, b)
    assert edges[b == 0].tolist() == [_key(-math.inf)] * 3
    assert edges[b == bins].tolist() == [_key(math.inf) + 1] * 3
    inner = (b > 0) & (b < bins)
    x = key_floats(edges[inner])
    for r, bb, e in zip(row[inner], b[inner], x, strict=True):
        below = np.nextafter(e, -np.inf)
        assert bin_of(e, r) >= bb > bin_of(below, r), (r, bb, e)


def test_cosine_floor_is_the_bound_less_a_small_margin() -> None:
    # Logit rows: a score is at most s + max(0, w) * max_quality; the floor takes that lift off
    # ``lowest`` and a margin of 1e-9 x (|lowest| + |lift| + 1).
    rows = ScoreRows("logit", np.array([-0.5, 0.25]), 2.0)
    assert rows.cosine_floor(0, 0.3) == pytest.approx(0.3 - 1e-9 * 1.3, abs=1e-15)
    assert rows.cosine_floor(1, 0.3) == pytest.approx(0.3 - 0.5 - 1e-9 * 1.8, abs=1e-15)
    assert rows.cosine_floor(1, -2.0) == pytest.approx(-2.0 - 0.5 - 1e-9 * 3.5, abs=1e-15)
    # QMagFace rows: the score is at most the cosine (omega <= 0): no lift.
    qrows = ScoreRows("qmagface", np.array([[0.08, 0.13]]), 30.0)
    assert qrows.cosine_floor(0, 0.4) == pytest.approx(0.4 - 1e-9 * 1.4, abs=1e-15)


def _recorded(values: np.ndarray, ranks: list[int], **budget: int) -> tuple[object, list]:
    """Order statistics of ``values`` (a weight-0 logit row) and the plan of every pass."""
    cos = np.asarray(values, np.float64)
    source = ArrayPairSource(cos, np.zeros(len(cos)), np.zeros(len(cos), np.int8))
    plans: list[PassPlan] = []

    def run_pass(plan: PassPlan) -> PassResult:
        plans.append(plan)
        return scan_blocks(source.shard_blocks(0), plan)

    rows = ScoreRows("logit", np.array([0.0]), 1.0)
    return order_statistics(run_pass, rows, np.array(ranks), len(cos), **budget), plans


def test_the_collect_budget_takes_the_smallest_intervals_first() -> None:
    """Pass 1 (64 bins over [-1, 1]) leaves the wanted ranks 1, 4 and 50 in three bins holding
    3 (values near 0.5), 3 (near 0.0) and 100 values (near -0.5). Pass 2 collects intervals in
    increasing count while they fit the budget: with 4 values one interval of 3, with 3 values
    also one (a count equal to what is left fits), with 6 both of 3; the 100 never."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.uniform(-0.5, -0.49, 100), rng.uniform(0.0, 0.01, 3), rng.uniform(0.5, 0.51, 3)]
    )
    want = np.sort(x)[::-1][[0, 3, 49]]
    for collect, n_collect in [(4, 1), (3, 1), (6, 2), (2, 0)]:
        got, plans = _recorded(x, [1, 4, 50], hist_cells=64, collect_values=collect)
        assert got.values.dtype == np.float64
        np.testing.assert_array_equal(got.values[0], want)
        assert plans[0].bins == 64
        assert plans[1].n_collect() == n_collect, collect
        assert sorted(plans[1].shift < 0) == sorted([True] * n_collect + [False] * (3 - n_collect))
    # 16 cells for 4 rows would be 4 bins each: the first pass never goes below 16 bins a row.
    four = ScoreRows("logit", np.zeros(4), 1.0)
    assert first_plan(four, genuine=False, hist_cells=16).bins == 16


def test_histogram_passes_use_the_cell_budget_and_no_more() -> None:
    """Every later pass splits each open interval into ``ceil(width / 2**shift)`` cells laid out
    one after another from cell 0; one interval alone gets more than half of ``hist_cells``
    (the largest power of two that fits) and never more."""
    x = np.random.default_rng(1).normal(size=5_000)
    got, plans = _recorded(x, [7], hist_cells=1024, collect_values=0)
    assert got.values[0, 0] == np.sort(x)[::-1][6]
    assert plans[0].bins <= 1024
    for plan in plans[1:]:
        hist = plan.shift >= 0
        width = plan.khi[hist] - plan.klo[hist]
        cells = -(-width // (2 ** plan.shift[hist]))  # ceil
        assert plan.cell[hist].tolist() == np.r_[0, np.cumsum(cells)[:-1]].tolist()
        assert plan.n_cells == int(cells.sum())
        if plan.n_cells > 8:  # not the last, narrow interval
            assert 512 < plan.n_cells <= 1024, plan.n_cells


def test_order_statistics_errors_and_empty_requests() -> None:
    cos = np.linspace(-0.9, 0.9, 50)
    source = ArrayPairSource(cos, np.zeros(50), np.zeros(50, np.int8))
    rows = ScoreRows("logit", np.array([0.0]), 1.0)

    def run_pass(plan: PassPlan) -> PassResult:
        return scan_blocks(source.shard_blocks(0), plan)

    for bad in ([0, 3], [3, 51]):
        with pytest.raises(ValueError, match=r"^ranks must lie in 1\.\.50, got "):
            order_statistics(run_pass, rows, np.array(bad), 50)
    with pytest.raises(RuntimeError, match=r"^a pass over the pairs saw 50 impostors, not 49$"):
        order_statistics(run_pass, rows, np.array([1]), 49)
    none = order_statistics(run_pass, rows, np.array([], np.int64), 50)
    assert none.values.shape == (1, 0) and none.passes == 1 and none.first.n_impostor == 50
    no_rows = order_statistics(run_pass, ScoreRows("logit", np.array([]), 1.0), np.array([1]), 50)
    assert no_rows.values.shape == (0, 1) and no_rows.passes == 1
    with pytest.raises(ValueError, match=r"^unknown score kind 'cosine'$"):
        ScoreRows("cosine", np.array([0.0]), 1.0)


def test_a_score_change_seen_by_a_histogram_pass_is_an_error() -> None:
    calls = []
    cos = np.random.default_rng(1).normal(size=10_000)
    rows = ScoreRows("logit", np.array([0.0]), 1.0)

    def run_pass(plan: PassPlan) -> PassResult:
        calls.append(plan)
        shift = 1e-3 * (len(calls) > 1)
        source = ArrayPairSource(cos + shift, np.zeros(len(cos)), np.zeros(len(cos), np.int8))
        return scan_blocks(source.shard_blocks(0), plan)

    with pytest.raises(RuntimeError, match=r"^scores changed between passes over the pairs: \d+ "
                       r"values in an interval that held \d+ \(sources must"):  # fmt: skip
        order_statistics(run_pass, rows, np.array([1, 50]), len(cos), collect_values=0)


def test_value_range_by_hand() -> None:
    """Scores for cosines in [-1, 1] and qualities in [0, max_quality], padded by 1e-6 of the
    span plus 1e-12: logit ``w q + s``, QMagFace ``s + min(0, beta s - alpha) q``."""
    rows = ScoreRows("logit", np.array([-0.2, 0.3]), 0.5)
    lo, hi = -1 - 0.2 * 0.5, 1.0
    pad = 1e-6 * (hi - lo) + 1e-12
    assert rows.value_range(0) == pytest.approx((lo - pad, hi + pad), abs=1e-15)
    lo, hi = -1.0, 1 + 0.3 * 0.5
    pad = 1e-6 * (hi - lo) + 1e-12
    assert rows.value_range(1) == pytest.approx((lo - pad, hi + pad), abs=1e-15)
    qrows = ScoreRows("qmagface", np.array([[0.08, 0.13]]), 0.5)
    lo, hi = -1 + (-0.13 - 0.08) * 0.5, 1.0  # the lowest at s = -1 and q = max_quality
    pad = 1e-6 * (hi - lo) + 1e-12
    assert qrows.value_range(0) == pytest.approx((lo - pad, hi + pad), abs=1e-15)
    # alpha -2: omega = min(0, beta s + 2) is 0 for every cosine in [-1, 1]: lo is -1
    lo, hi = -1.0, 1.0
    pad = 1e-6 * (hi - lo) + 1e-12
    neg = ScoreRows("qmagface", np.array([[-2.0, 0.13]]), 0.5)
    assert neg.value_range(0) == pytest.approx((lo - pad, hi + pad), abs=1e-15)


def test_scores_are_written_into_the_given_buffer() -> None:
    cos, q = np.array([0.5, -0.25]), np.array([2.0, 4.0])
    for rows, want in [
        (ScoreRows("logit", np.array([0.1]), 4.0), [0.5 + 0.2, -0.25 + 0.4]),
        # omega = min(0, 0.5 s - 0.25): 0 at s = 0.5; -0.375 at s = -0.25
        (ScoreRows("qmagface", np.array([[0.25, 0.5]]), 4.0), [0.5, -0.25 - 0.375 * 4]),
    ]:
        buf = np.empty(2)
        got = rows.score(0, cos, q, out=buf)
        assert got is buf
        np.testing.assert_allclose(buf, want, rtol=0, atol=1e-15)


def test_first_bins_send_huge_values_to_the_edge_bins_quietly() -> None:
    from qmag_ray.calibration.orderstats import _first_bins

    x = np.array([-np.inf, -1.0, 0.0, 0.49, 1.7e308, np.inf])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _first_bins(x.copy(), -1.0, 8.0, 16)  # floor(clip((x + 1) * 8, 0, 15))
    assert got.tolist() == [0, 0, 8, 11, 15, 15]


def test_several_rows_over_chunks_and_blocks_equal_a_full_sort() -> None:
    """Three weight rows (scores ``w * q + s``, worked here), more pairs than one scan chunk
    (2**18) and, in a second source, many small blocks: every row's ranks equal a full sort."""
    rng = np.random.default_rng(3)
    n = 300_000
    cos = np.round(rng.normal(0.0, 0.3, n), 3)  # ties
    q = rng.uniform(10.0, 30.0, n)
    ranks = np.array([1, 2, 50, 999, 3_000, n])
    for weights, block_size in [
        (np.array([-0.02, 0.0, 0.03]), 1 << 20),
        (np.array([-0.02, 0.0, 0.03]), 7_777),
        (np.array([0.01, -0.01]), 1 << 20),  # two rows
    ]:
        rows = ScoreRows("logit", weights, float(q.max()))
        source = ArrayPairSource(cos, q, np.zeros(n, np.int8), block_size=block_size)

        def run_pass(plan: PassPlan, source: ArrayPairSource = source) -> PassResult:
            return scan_blocks(source.shard_blocks(0), plan)

        got = order_statistics(run_pass, rows, ranks, n, hist_cells=3 * 64, collect_values=64)
        for r, w in enumerate(weights):
            desc = np.sort(w * q + cos)[::-1]
            np.testing.assert_array_equal(got.values[r], desc[ranks - 1])
        assert got.passes > 2
    # A first block of genuine pairs only (no impostor to score) does not end the pass.
    label = np.r_[np.ones(10, np.int8), np.zeros(n - 10, np.int8)]
    source = ArrayPairSource(cos, q, label, block_size=10)
    got = order_statistics(
        lambda plan: scan_blocks(source.shard_blocks(0), plan), rows, ranks[:-1], n - 10
    )
    for r, w in enumerate(weights):
        desc = np.sort((w * q + cos)[10:])[::-1]
        np.testing.assert_array_equal(got.values[r], desc[ranks[:-1] - 1])
    # float32 blocks (as the exhaustive source yields) are scored in float64.
    c32, q32 = cos.astype(np.float32), q.astype(np.float32)
    block = PairBlock(c32, q32, np.zeros(n, np.int8))
    got = order_statistics(lambda plan: scan_blocks([block], plan), rows, ranks, n)
    for r, w in enumerate(weights):
        desc = np.sort(w * q32.astype(np.float64) + c32.astype(np.float64))[::-1]
        np.testing.assert_array_equal(got.values[r], desc[ranks - 1])


def test_weighted_logits_of_float32_qualities_are_float64() -> None:
    from qmag_ray.calibration.search import weighted_logits

    q32, c32 = np.array([17.3], np.float32), np.array([0.1], np.float32)
    got = weighted_logits(c32, q32, 0.3)
    assert got.dtype == np.float64
    assert got[0] == 0.3 * float(q32[0]) + float(c32[0])
