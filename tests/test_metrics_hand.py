"""Metrics on sets small enough to work by hand (spec section 4), and their error messages.

Every expected value is derived in the comments from the definitions, not by the code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qmag_ray import metrics
from qmag_ray.fmr import measurable

# Genuine 0.9, 0.8, 0.5; impostors 0.5, 0.1 (a genuine/impostor tie at 0.5).
S = np.array([0.9, 0.8, 0.5, 0.5, 0.1])
Y = np.array([1, 1, 1, 0, 0])


def test_eer_interpolates_on_a_diagonal_roc_segment() -> None:
    # ROC points (FMR, FNMR): (0, 1) -> (0, 1/3) at t=0.8 -> (1/2, 0) at t=0.5 (the tie moves
    # both). FNMR - FMR: 1/3 at the second point, -1/2 at the third: t = (1/3) / (5/6) = 0.4,
    # EER = 0 + 0.4 * (1/2 - 0) = 0.2 (and FNMR there: 1/3 - 0.4 * 1/3 = 0.2).
    assert metrics.eer(S, Y) == pytest.approx(0.2, abs=1e-12)
    # Perfectly separated: 0; reversed: 1.
    assert metrics.eer(np.array([0.9, 0.1]), np.array([1, 0])) == 0.0
    assert metrics.eer(np.array([0.1, 0.9]), np.array([1, 0])) == pytest.approx(1.0)
    assert math.isnan(metrics.eer(np.array([0.5, 0.4]), np.array([1, 1])))


def test_auc_counts_ties_as_half() -> None:
    # 6 (genuine, impostor) orderings: 0.9 and 0.8 beat both (4), 0.5 ties 0.5 (1/2) and beats
    # 0.1 (1): 5.5 / 6.
    assert metrics.roc_auc(S, Y) == pytest.approx(5.5 / 6, abs=1e-12)
    assert math.isnan(metrics.roc_auc(np.array([0.5, 0.4]), np.array([0, 0])))


def test_supports_needs_one_possible_false_match() -> None:
    assert measurable(1e-3, 1_000) and measurable(0.5, 2)
    assert not measurable(1e-3, 999) and not measurable(0.5, 1)


def test_operating_thresholds_worked_by_hand() -> None:
    # Genuine 0.9, 0.8, 0.5; impostors 0.85 > 0.5 > 0.1 > 0.05 > 0 (N = 5). FMR <= 0.2 lets
    # one pass: t > 0.5 (the 2nd impostor) -> the smallest genuine above it is 0.8, FNMR 1/3.
    # FMR <= 0.4 lets two pass: t > 0.1 -> 0.5, FNMR 0. FMR 0.1 (< 1/5) cannot be measured.
    s = np.array([0.9, 0.8, 0.5, 0.85, 0.5, 0.1, 0.05, 0.0])
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    fnmr, thr = metrics.operating_thresholds(s, y, [0.2, 0.4, 0.1])
    np.testing.assert_array_equal(thr[:2], [0.8, 0.5])
    np.testing.assert_allclose(fnmr[:2], [1 / 3, 0.0], rtol=0, atol=1e-15)
    assert math.isnan(fnmr[2]) and math.isnan(thr[2])
    np.testing.assert_allclose(metrics.fnmr_at_fmr(s, y, [0.2, 0.4]), [1 / 3, 0.0], atol=1e-15)
    # No genuine pairs: nothing is measurable.
    fnmr, thr = metrics.operating_thresholds(np.array([0.1, 0.2]), np.array([0, 0]), [0.5])
    assert math.isnan(fnmr[0]) and math.isnan(thr[0])


def test_benchmark_accuracy_worked_by_hand() -> None:
    # Two folds: [0.9 g, 0.1 i] and [0.8 g, 0.2 i]; thresholds linspace(0.1, 0.9, 600).
    # Fold 1 trains on (0.8 g, 0.2 i): right for 0.2 <= t < 0.8; the first grid value there
    # is 0.1 + 75 * 0.8 / 599; on (0.9, 0.1) both right: 100 %.
    # Fold 2 trains on (0.9, 0.1): right for 0.1 <= t < 0.9, first grid value 0.1 itself;
    # on (0.8 g, 0.2 i): 0.8 > 0.1 right, 0.2 > 0.1 a false match: 50 %.
    s = np.array([0.9, 0.1, 0.8, 0.2])
    y = np.array([1, 0, 1, 0])
    got = metrics.benchmark_accuracy(s, y, folds=2)
    assert got["fold_accuracies"] == [100.0, 50.0]
    assert got["accuracy"] == 75.0 and got["std"] == 25.0  # population std
    assert got["fold_thresholds"] == pytest.approx([0.1 + 75 * 0.8 / 599, 0.1], abs=1e-15)
    assert got["folds"] == 2
    with pytest.raises(ValueError, match="needs at least 10 pairs, got 4"):
        metrics.benchmark_accuracy(s, y)


def test_error_versus_discard_worked_by_hand() -> None:
    # By quality: g 0.3 (q 1), i 0.7 (q 2), i 0.2 (q 3), g 0.9 (q 4); FMR 0.5.
    # 0 %: impostors 0.7 > 0.2, one may pass: t > 0.2 -> 0.3, FNMR 0; fixed threshold 0.3
    #      (FMR there: 0.7 >= 0.3, 1 of 2).
    # 25 %: g 0.3 gone: t > 0.2 -> 0.9, FNMR 0; at the fixed 0.3: FNMR 0, FMR 1/2.
    # 50 %: g 0.9, i 0.2 kept: one impostor cannot measure 0.5 -> None; fixed: 0 and 0.
    s = np.array([0.9, 0.3, 0.7, 0.2])
    y = np.array([1, 1, 0, 0])
    q = np.array([4.0, 1.0, 2.0, 3.0])
    got = metrics.error_versus_discard(s, y, q, fmr=0.5, steps=(0.0, 0.25, 0.5))
    assert got == {
        "fmr": 0.5,
        "discard": [0.0, 0.25, 0.5],
        "fixed_threshold": 0.3,
        "kept_genuine": [2, 1, 1],
        "kept_impostor": [2, 2, 1],
        "fnmr_rederived": [0.0, 0.0, None],
        "fnmr_fixed_threshold": [0.0, 0.0, 0.0],
        "fmr_fixed_threshold": [0.5, 0.5, 0.0],
    }
    # At 0.75 one pair (g 0.9) is left: no impostor, nothing measurable.
    last = metrics.error_versus_discard(s, y, q, fmr=0.5, steps=(0.75,))
    assert last["fnmr_rederived"] == [None] and last["fnmr_fixed_threshold"] == [None]
    assert last["kept_genuine"] == [1] and last["kept_impostor"] == [0]
    with pytest.raises(ValueError, match="quality and scores differ in length: 3 and 4"):
        metrics.error_versus_discard(s, y, q[:3])


def test_input_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="scores and labels differ in length: 5 and 4"):
        metrics.eer(S, Y[:4])
    bad = S.copy()
    bad[3] = np.inf
    with pytest.raises(ValueError, match="non-finite values, first at index 3"):
        metrics.fnmr_at_fmr(bad, Y)
    with pytest.raises(ValueError, match=r"^labels must be 1 \(genuine\) or 0 \(impostor\)$"):
        metrics.roc_auc(S, np.array([1, 1, 2, 0, 0]))


def test_report_and_table_of_a_small_set() -> None:
    # 10 pairs so that 10 folds work: genuine 0.9..0.5 (quality 10..14), impostors 0.6..0.2.
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.6, 0.5, 0.4, 0.3, 0.2])
    y = np.array([1] * 5 + [0] * 5)
    q = np.arange(10.0, 20.0)
    report = metrics.verification_report(s, s * 2, y, q, fmrs=(0.2, 0.01), edc_fmr=0.2)
    assert (report["n_pairs"], report["n_genuine"], report["n_impostor"]) == (10, 5, 5)
    assert report["fmrs"] == ["2e-01", "1e-02"]
    cos = report["scores"]["cosine"]
    # FMR <= 0.2 lets one of 5 impostors pass: t > 0.5 (the 2nd impostor) -> 0.6, 4 of 5
    # genuine accepted: FNMR 0.2. 0.01 cannot be measured on 5 impostors: absent.
    assert cos["fnmr_at_fmr"] == {"2e-01": pytest.approx(0.2)}
    assert cos["threshold_at_fmr"] == {"2e-01": 0.6}
    assert report["scores"]["qmagface"]["threshold_at_fmr"] == {"2e-01": 1.2}  # scores x 2
    assert cos["edc"]["fmr"] == 0.2 and cos["edc"]["discard"][:3] == [0.0, 0.05, 0.1]
    assert set(cos) == {"fnmr_at_fmr", "threshold_at_fmr", "eer", "auc", "accuracy",
                        "accuracy_std", "edc"}  # fmt: skip
    assert report["conventions"]["fnmr_at_fmr"].startswith(
        "ISO/IEC 19795-1: lowest FNMR among thresholds with FMR <= target; match iff score >= "
    )
    assert report["conventions"]["accuracy"].startswith("10 contiguous folds")
    table = metrics.format_table(report, edc_points=(0.1,))
    lines = table.splitlines()
    assert lines[0] == "5 genuine / 5 impostor pairs"
    # FMR 0.2 on 5 impostors rests on floor(0.2 * 5) = 1 false match (marked: fewer than 10).
    first = "FNMR % @ FMR 2e-01 [1* false matches]"
    width = max(len(first), len("FNMR % @ FMR 2e-01, 10% discarded"))
    assert lines[1] == f"{'metric':<{width}}  {'cosine':>15}  {'QMagFace':>15}"
    assert lines[2] == "-" * (width + 34)
    assert lines[3] == f"{first:<{width}}  {'20.000':>15}  {'20.000':>15}"
    assert lines[4] == f"{'FNMR % @ FMR 1e-02':<{width}}  {'-':>15}  {'-':>15}"
    eer = f"{100 * cos['eer']:.3f}"
    assert cos["eer"] > 0 and lines[5] == f"{'EER %':<{width}}  {eer:>15}  {eer:>15}"
    auc = f"{100 * cos['auc']:.4f}"
    assert lines[6] == f"{'ROC AUC %':<{width}}  {auc:>15}  {auc:>15}"
    acc = f"{cos['accuracy']:.2f} ± {cos['accuracy_std']:.2f}"
    assert lines[7] == f"{'Accuracy % (10-fold)':<{width}}  {acc:>15}  {acc:>15}"
    edc = cos["edc"]["fnmr_rederived"][2]
    edc_text = "-" if edc is None else f"{100 * edc:.3f}"
    assert (
        lines[8]
        == f"{'FNMR % @ FMR 2e-01, 10% discarded':<{width}}  {edc_text:>15}  {edc_text:>15}"
    )
    assert lines[9] == "* fewer than 10 false matches: that FNMR is a rough figure"
    assert len(lines) == 10


def test_report_defaults_and_folds() -> None:
    # The 4-pair set of the benchmark test: 2 folds give 100 % and 50 % (worked out above).
    s = np.array([0.9, 0.1, 0.8, 0.2])
    y = np.array([1, 0, 1, 0])
    report = metrics.verification_report(s, s, y, np.ones(4), fmrs=(0.5,), folds=2)
    cos = report["scores"]["cosine"]
    assert (cos["accuracy"], cos["accuracy_std"]) == (75.0, 25.0)
    assert report["conventions"]["accuracy"].startswith("2 contiguous folds")
    assert cos["edc"]["fmr"] == 1e-3  # the default EDC operating point


def test_report_states_its_conventions() -> None:
    """metrics.json documents how every figure was computed: the text is part of the output."""
    s = np.array([0.9, 0.1, 0.8, 0.2])
    report = metrics.verification_report(s, s, np.array([1, 0, 1, 0]), np.ones(4), folds=2)
    assert report["conventions"] == {
        "fnmr_at_fmr": "ISO/IEC 19795-1: lowest FNMR among thresholds with FMR <= target; "
        "match iff score >= threshold; only FMRs >= 1/n_impostor are reported",
        "rates": "fractions (eer, auc, fnmr_at_fmr); accuracy and accuracy_std in percent",
        "accuracy": "2 contiguous folds, best of 600 linear thresholds on the other folds, "
        "match iff score > threshold",
        "edc": "pairs discarded by lowest pair quality; fnmr_rederived re-derives the threshold "
        "at each step, fnmr_fixed_threshold keeps the 0% threshold",
    }


def test_accuracy_counts_a_score_equal_to_the_threshold_as_no_match() -> None:
    # Genuine 0.5, 0.8; impostor 0.2; t = 0.5: 0.5 > 0.5 is false, so one genuine hit, and the
    # impostor is rejected: 2 of 3 right. At t = 0.1 all three are matches: 2 of 3 right.
    got = metrics._accuracy_at(np.array([0.5, 0.8]), np.array([0.2]), np.array([0.5, 0.1]))
    np.testing.assert_allclose(got, [2 / 3, 2 / 3], rtol=0, atol=1e-15)
    got = metrics._accuracy_at(np.array([0.5, 0.8]), np.array([0.2, 0.6]), np.array([0.6]))
    np.testing.assert_allclose(got, [0.75], rtol=0, atol=1e-15)  # 0.8 hit, 0.2 and 0.6 rejected
    # In the benchmark: each fold's threshold is 0.1 (the lowest grid value); a test impostor
    # scoring exactly 0.1 is rejected (0.1 > 0.1 is false): 100 % on both folds.
    s = np.array([0.1, 0.9, 0.1, 0.9])
    got = metrics.benchmark_accuracy(s, np.array([0, 1, 0, 1]), folds=2)
    assert got["fold_thresholds"] == [0.1, 0.1] and got["fold_accuracies"] == [100.0, 100.0]


def test_edc_default_operating_point() -> None:
    s = np.array([0.9, 0.3, 0.7, 0.2])
    got = metrics.error_versus_discard(s, np.array([1, 1, 0, 0]), np.arange(4.0))
    assert got["fmr"] == 1e-3 and len(got["discard"]) == 20 and got["discard"][-1] == 0.95


def test_eer_interpolates_between_two_points_away_from_zero() -> None:
    # Genuine 0.9, 0.8, 0.6, 0.3; impostors 0.95, 0.6, 0.2, 0.1. ROC (FMR, FNMR): (1/4, 1/2)
    # after 0.8, then the tie at 0.6 gives (1/2, 1/4). FNMR - FMR: 1/4 then -1/4: t = 1/2,
    # EER = 1/4 + 1/2 * (1/2 - 1/4) = 3/8.
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.95, 0.6, 0.2, 0.1])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    assert metrics.eer(s, y) == pytest.approx(0.375, abs=1e-12)


def test_one_impostor_or_one_genuine_is_enough_to_measure() -> None:
    s, y = np.array([0.9, 0.5, 0.7]), np.array([1, 1, 0])
    # FMR 1.0 on one impostor: it may pass, every genuine is accepted; t = the lowest genuine.
    fnmr, thr = metrics.operating_thresholds(s, y, [1.0])
    assert fnmr.tolist() == [0.0] and thr.tolist() == [0.5]
    assert metrics.roc_auc(s, y) == 0.5  # 0.9 beats 0.7, 0.5 does not
    assert metrics.roc_auc(np.array([0.9, 0.5, 0.95]), np.array([1, 0, 0])) == 0.5


def test_edc_fixed_threshold_counts_an_impostor_at_the_threshold() -> None:
    # Genuine 0.6, 0.9; impostors 0.6, 0.2; FMR 0.5: t > 0.2 -> 0.6 (FNMR 0), and the
    # impostor at 0.6 is a false match there: FMR 1/2. At 75 % one pair is left: None.
    s = np.array([0.6, 0.9, 0.6, 0.2])
    y = np.array([1, 1, 0, 0])
    got = metrics.error_versus_discard(s, y, np.arange(4.0), fmr=0.5, steps=(0.0, 0.75))
    assert got["fixed_threshold"] == 0.6
    assert got["fmr_fixed_threshold"] == [0.5, None] and got["fnmr_fixed_threshold"] == [0.0, None]


def test_edc_discards_equal_qualities_in_input_order() -> None:
    # 400 pairs of one quality: the first 100 (impostors scoring 0.99) go first.
    s = np.r_[np.full(100, 0.99), np.linspace(0.5, 0.9, 150), np.linspace(0.0, 0.4, 150)]
    y = np.r_[np.zeros(100, int), np.ones(150, int), np.zeros(150, int)]
    got = metrics.error_versus_discard(s, y, np.ones(400), fmr=0.01, steps=(0.25,))
    assert got["kept_genuine"] == [150] and got["kept_impostor"] == [150]
    assert got["fnmr_rederived"] == [0.0]


def test_tar_table_and_its_console_table_worked_by_hand() -> None:
    # 10 impostors (0.9, 0.8, eight at 0.1) and genuine pairs of two scores:
    # "a": 0.95, 0.85, 0.7. ISO at FAR 0.16: one false accept allowed, threshold 0.85, TAR 2/3.
    #   ROC (FPR, TPR), all corners kept: (0,0) (0,1/3) (0.1,1/3) (0.1,2/3) (0.2,2/3) (0.2,1)
    #   (1,1); reversed, the first point nearest to 0.16 is (0.2, 1): 1; nearest to 0.01 is
    #   the first FPR-0 point, (0, 1/3): 1/3. 10 impostors cannot measure 0.01: ISO None.
    # "b": 0.99, 0.98, 0.97 (all above every impostor): ISO 1 at 0.16; nearest 1 at both.
    imp = [0.9, 0.8] + [0.1] * 8
    labels = np.array([0] * 10 + [1, 1, 1])
    scores = {"a": np.array(imp + [0.95, 0.85, 0.7]), "b": np.array(imp + [0.99, 0.98, 0.97])}
    table = metrics.tar_table(scores, labels, (0.16, 0.01))
    assert table["fars"] == [0.16, 0.01]
    assert table["iso"]["a"]["2e-01"] == pytest.approx(2 / 3, abs=1e-12)
    assert table["iso"]["a"]["1e-02"] is None and table["iso"]["b"]["1e-02"] is None
    assert table["iso"]["b"]["2e-01"] == 1.0
    assert table["nearest"]["a"] == {"2e-01": 1.0, "1e-02": pytest.approx(1 / 3, abs=1e-12)}
    assert table["nearest"]["b"] == {"2e-01": 1.0, "1e-02": 1.0}
    assert set(table) == {"fars", "iso", "nearest"}
    lines = metrics.format_tar_table(table).splitlines()
    assert lines[0] == "TAR % @ FAR   " + "a ISO".rjust(16) + "a nearest".rjust(18) + (
        "b ISO".rjust(16) + "b nearest".rjust(18)
    )
    assert lines[1] == "2e-01         " + "66.667".rjust(16) + "100.000".rjust(18) + (
        "100.000".rjust(16) + "100.000".rjust(18)
    )
    assert lines[2] == "1e-02         " + "-".rjust(16) + "33.333".rjust(18) + (
        "-".rjust(16) + "100.000".rjust(18)
    )
    assert lines[3] == (
        "ISO: best threshold with FAR <= f; nearest: the ROC point whose FAR is nearest to f "
        "(InsightFace's IJB tables)"
    )
    assert len(lines) == 4


def test_nearest_tar_with_one_pair_of_a_class_or_none() -> None:
    # One genuine (0.9), impostors 0.5 and 0.1: scikit-learn drops the collinear middle
    # point, ROC (0,0) (0,1) (1,1); reversed, the first point nearest to FAR 0.1 is (0, 1): 1.
    assert (
        metrics.tar_at_far_nearest(np.array([0.9, 0.5, 0.1]), np.array([1, 0, 0]), [0.1])[0] == 1.0
    )
    # One impostor (0.5), genuine 0.9 and 0.1: ROC (0,0) (0,1/2) (1,1/2) (1,1); reversed,
    # nearest to 0.1 is (0, 1/2).
    assert (
        metrics.tar_at_far_nearest(np.array([0.5, 0.9, 0.1]), np.array([0, 1, 1]), [0.1])[0] == 0.5
    )
    # Without impostors or without genuine pairs: NaN at every FAR.
    for labels in ([1, 1], [0, 0]):
        got = metrics.tar_at_far_nearest(np.array([0.9, 0.8]), np.array(labels), (0.1, 0.01))
        assert got.shape == (2,) and np.isnan(got).all()


def test_table_without_rough_figures_has_no_marks() -> None:
    # 20 impostors (0.05 .. 1.0 in steps of 0.05) and 5 genuine pairs: FMR 0.5 rests on
    # floor(0.5 * 20) = 10 false matches, not fewer than 10: no mark, no footnote.
    s = np.r_[np.arange(1, 21) / 20, [0.9, 0.8, 0.7, 0.6, 0.5]]
    y = np.r_[np.zeros(20, int), np.ones(5, int)]
    report = metrics.verification_report(s, s, y, np.ones(25), fmrs=(0.5,))
    table = metrics.format_table(report)
    assert "FNMR % @ FMR 5e-01 [10 false matches]" in table
    assert "*" not in table and "rough figure" not in table


def test_edc_keeps_input_order_among_equal_qualities_after_better_ones() -> None:
    # 20 pairs of quality 1 (10 genuine at 0.8, 10 impostors at 0.1) followed by 20 of
    # quality 0 (10 impostors at 0.99, then 10 genuine at 0.3). Discarding 25 % = 10 pairs
    # takes the first 10 quality-0 pairs in input order: exactly the 10 impostors at 0.99.
    # (An unstable sort reorders the tied block, which starts in the middle of the input.)
    s = np.r_[np.full(10, 0.8), np.full(10, 0.1), np.full(10, 0.99), np.full(10, 0.3)]
    y = np.r_[np.ones(10, int), np.zeros(10, int), np.zeros(10, int), np.ones(10, int)]
    q = np.r_[np.ones(20), np.zeros(20)]
    got = metrics.error_versus_discard(s, y, q, fmr=0.1, steps=(0.25,))
    assert got["kept_genuine"] == [20] and got["kept_impostor"] == [10]
    # FMR 0.1 on the 10 kept impostors (all 0.1): one may pass, but a threshold at 0.1
    # passes all ten, so t is the next score, 0.3: every kept genuine accepted.
    assert got["fnmr_rederived"] == [0.0]


def test_one_class_gives_nan_without_asking_scikit_learn() -> None:
    # Without impostors or without genuine pairs EER and AUC are undefined: NaN, decided
    # before scikit-learn is called (which would warn about the missing class).
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for labels in ([1, 1], [0, 0]):
            y = np.array(labels)
            assert math.isnan(metrics.eer(np.array([0.9, 0.4]), y))
            assert math.isnan(metrics.roc_auc(np.array([0.9, 0.4]), y))


def test_operating_points_need_every_impostor_score() -> None:
    from qmag_ray.fmr import operating_points

    with pytest.raises(ValueError, match=r"^need all 3 impostor scores, got 2$"):
        operating_points(np.array([0.9]), np.array([0.5, 0.1]), 3, np.array([0.5]), strict=False)


def test_impostor_counts_need_an_impostor_and_fmrs_count_false_matches() -> None:
    from qmag_ray.fmr import impostor_counts, supported_fmrs

    with pytest.raises(ValueError, match="^operating points need at least one impostor score$"):
        impostor_counts(0, np.array([0.1]), strict=False)
    # 1000 impostors: FMR 0.1 allows 100 false matches, 0.01 allows 10; asking for 20.
    assert supported_fmrs([0.1, 0.01], 1000, 20) == [0.1]
    assert supported_fmrs([0.1, 0.01], 1000) == [0.1, 0.01]
