"""Metrics (spec section 4) on inputs small enough to check by hand, the report and the plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from oracle import oracle_fnmr_at_fmr
from oracle import oracle_qmagface as qmagface_score

from qmag_ray import metrics, plots
from qmag_ray.calibration.fit import fit_qmagface

PNG = b"\x89PNG\r\n\x1a\n"


def _pairs(gen: list[float], imp: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(gen + imp), np.array([1] * len(gen) + [0] * len(imp))


def test_fnmr_at_fmr_iso_convention_by_hand() -> None:
    # 10 impostors 0.7 > 0.6 > ... ; genuine 0.95, 0.65, 0.55, 0.25.
    imp = [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.0]
    s, y = _pairs([0.95, 0.65, 0.55, 0.25], imp)
    fnmr, thr = metrics.operating_thresholds(s, y, [0.1, 0.3, 0.5, 0.01])
    # FMR <= 0.1: one impostor may pass, so t > 0.6: genuine 0.95 and 0.65 accepted.
    # FMR <= 0.3: t > 0.4: three accepted. FMR <= 0.5: t > 0.2: all four accepted.
    # FMR 0.01 < 1/10 cannot be measured on 10 impostors.
    np.testing.assert_array_equal(fnmr[:3], [0.5, 0.25, 0.0])
    np.testing.assert_array_equal(thr[:3], [0.65, 0.55, 0.25])
    assert math.isnan(fnmr[3]) and math.isnan(thr[3])
    # Exactly 1/N is measurable.
    assert metrics.fnmr_at_fmr(s, y, [0.1])[0] == 0.5


def test_fnmr_at_fmr_matches_the_roc_definition_on_random_scores() -> None:
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.2).astype(int)
    s = np.round(np.where(y == 1, rng.normal(1, 1, y.size), rng.normal(-1, 1, y.size)), 2)
    fmrs = [1e-1, 1e-2, 1e-3, 1e-5]
    fpr, tpr, _ = roc_curve(y, s)
    want = [np.min(1 - tpr[fpr <= f]) for f in fmrs[:3]]
    got = metrics.fnmr_at_fmr(s, y, fmrs)
    np.testing.assert_allclose(got[:3], want, atol=1e-12)
    assert math.isnan(got[3])  # 1e-5 < 1 / 16,000 impostors


def test_eer_and_auc_by_hand() -> None:
    s, y = _pairs([0.9, 0.6], [0.7, 0.1])
    assert metrics.eer(s, y) == pytest.approx(0.5)
    assert metrics.roc_auc(s, y) == pytest.approx(0.75)  # 3 of 4 (genuine, impostor) orderings
    # Crossing inside a segment: from (FMR 0, FNMR 1/3) to (FMR 1/2, FNMR 1/3) -> EER 1/3.
    s, y = _pairs([0.9, 0.8, 0.3], [0.7, 0.2])
    assert metrics.eer(s, y) == pytest.approx(1 / 3)
    s, y = _pairs([0.9, 0.8], [0.1, 0.2])
    assert metrics.eer(s, y) == 0.0 and metrics.roc_auc(s, y) == 1.0


def test_benchmark_accuracy_uses_contiguous_folds_by_hand() -> None:
    # Fold 1 = pairs 0-3, fold 2 = pairs 4-7. Thresholds: 600 from 0.0 to 0.8.
    s = np.array([0.8, 0.7, 0.2, 0.1, 0.5, 0.45, 0.6, 0.0])
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    got = metrics.benchmark_accuracy(s, y, folds=2)
    # Test fold 1: trained on fold 2, the best accuracy (3/4) first at t = 0.0; on fold 1 that
    # accepts the impostors 0.2 and 0.1 too: 50 %. Test fold 2: trained on fold 1, 100 % from
    # the first threshold >= 0.2 (grid step 0.8/599); on fold 2 only the impostor 0.6 is wrong.
    assert got["fold_thresholds"][0] == 0.0
    assert 0.2 <= got["fold_thresholds"][1] < 0.2 + 0.8 / 599
    assert got["fold_accuracies"] == [50.0, 75.0]
    assert got["accuracy"] == 62.5 and got["std"] == 12.5
    # Shuffling would mix the folds and change the answer: order matters.
    assert metrics.benchmark_accuracy(s[[0, 4, 1, 5, 2, 6, 3, 7]], y[[0, 4, 1, 5, 2, 6, 3, 7]], 2)[
        "fold_accuracies"
    ] != [50.0, 75.0]


def test_error_versus_discard_by_hand() -> None:
    # quality:    1    2    3    4    5    6    7    8
    s = np.array([0.2, 0.6, 0.9, 0.1, 0.8, 0.3, 0.7, 0.2])
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    q = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=float)
    got = metrics.error_versus_discard(s, y, q, fmr=0.25, steps=(0.0, 0.25, 0.5))
    # 0 %: 4 impostors, one may pass: t > 0.3 -> genuine 0.2 rejected, FNMR 1/4, t = 0.7.
    # 25 %: pairs of quality 1 and 2 go; 3 impostors cannot measure FMR 0.25 (re-derived:
    # None); the fixed threshold 0.7 now rejects no genuine pair and passes no impostor.
    assert got["fixed_threshold"] == 0.7
    assert got["fnmr_rederived"] == [0.25, None, None]
    assert got["fnmr_fixed_threshold"] == [0.25, 0.0, 0.0]
    assert got["fmr_fixed_threshold"] == [0.0, 0.0, 0.0]
    assert got["kept_genuine"] == [4, 3, 2] and got["kept_impostor"] == [4, 3, 2]
    default = metrics.error_versus_discard(s, y, q, fmr=0.5)
    assert len(default["discard"]) == 20 and default["discard"][-1] == 0.95


def _calibrated_set(n: int = 120_000, seed: int = 3):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(int)
    q = rng.uniform(12, 35, n)
    z = (q - 23.5) / 6.6
    cos = np.where(y == 1, rng.normal(0.55, 0.15, n) + 0.06 * z, rng.normal(0, 0.09, n) - 0.02 * z)
    cal = fit_qmagface(cos, q, y, fmr_min=1e-4)
    return cos, q, y, cal


def test_verification_report_side_by_side_and_table() -> None:
    cos, q, y, cal = _calibrated_set()
    qmf = qmagface_score(cos, q, cal.alpha, cal.beta)
    report = metrics.verification_report(cos, qmf, y, q)
    json.dumps(report, allow_nan=False)  # metrics.json must be strict JSON
    c, m = report["scores"]["cosine"], report["scores"]["qmagface"]
    # ~108,000 impostors support FMR 1e-5 but not 1e-6.
    assert set(c["fnmr_at_fmr"]) == {"1e-01", "1e-02", "1e-03", "1e-04", "1e-05"}
    assert c["fnmr_at_fmr"]["1e-03"] == pytest.approx(
        oracle_fnmr_at_fmr(cos, y, [1e-3])[0], abs=1e-12
    )
    assert m["accuracy"] == metrics.benchmark_accuracy(qmf, y)["accuracy"]
    assert m["fnmr_at_fmr"]["1e-03"] == pytest.approx(
        oracle_fnmr_at_fmr(qmf, y, [1e-3])[0], abs=1e-12
    )
    assert m["fnmr_at_fmr"] != c["fnmr_at_fmr"]  # two different scores, side by side
    table = metrics.format_table(report)
    assert "FNMR % @ FMR 1e-03" in table and "Accuracy % (10-fold)" in table
    assert f"{100 * c['fnmr_at_fmr']['1e-03']:.3f}" in table
    row_1e6 = next(line for line in table.splitlines() if "FMR 1e-06" in line)
    assert row_1e6.split()[-2:] == ["-", "-"]


def test_plots_are_valid_png_files(tmp_path) -> None:
    cos, q, y, cal = _calibrated_set(40_000, seed=4)
    qmf = cal.score(cos, q)
    report = metrics.verification_report(cos, qmf, y, q, edc_fmr=1e-2)
    out = str(tmp_path / "plots")
    written = plots.write_plots(
        out,
        labels=y,
        quality=q,
        scores={"cosine": cos, "QMagFace": qmf},
        report=report,
        calibration=cal,
    )
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["det.png", "edc.png", "quality_histograms.png", "weight_threshold.png"]
    for path in written:
        with open(path, "rb") as f:
            data = f.read()
        assert data.startswith(PNG) and len(data) > 5_000


@pytest.mark.s3
def test_plot_to_object_storage(s3_bucket: str) -> None:
    from qmag_ray import storage

    s, y = _pairs([0.9, 0.8, 0.3], [0.7, 0.2])
    uri = plots.det_curves(f"{s3_bucket}/run/det.png", {"cosine": s}, y)
    assert storage.read_bytes(uri).startswith(PNG)
