"""Verification metrics (spec section 4) in the conventions users compare against.

Rates are fractions in [0, 1] unless a name says percent. A comparison is a match when its
score reaches the threshold (``score >= t``, ISO/IEC 19795-1), except in the LFW-style
benchmark accuracy, which uses ``score > t`` as the published evaluation does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# REPORT_FMRS: the FMRs reported by default; only those the data measures (>= one false
# match, ``measurable``) are filled.
from qmag_ray.fmr import REPORT_FMRS, fmr_key, measurable, operating_points

#: Error-versus-discard steps: 0 %, 5 %, ..., 95 % of pairs discarded by lowest pair quality.
DISCARD_STEPS = tuple(round(0.05 * i, 2) for i in range(20))


def _split(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor scores, after checking the inputs."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel()
    if len(s) != len(y):
        raise ValueError(f"scores and labels differ in length: {len(s)} and {len(y)}")
    if not np.isfinite(s).all():
        raise ValueError(
            f"scores contain non-finite values, first at index {np.argmin(np.isfinite(s))}"
        )
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 1 (genuine) or 0 (impostor)")
    return s[y == 1], s[y == 0]


def operating_thresholds(
    scores: np.ndarray, labels: np.ndarray, fmrs: tuple[float, ...] | np.ndarray = REPORT_FMRS
) -> tuple[np.ndarray, np.ndarray]:
    """ISO operating points: per FMR ``f`` the lowest FNMR among thresholds with FMR <= f.

    Returns (fnmr, threshold) arrays, NaN where the data cannot measure ``f`` (f < 1/N_imp).
    Among thresholds with the same lowest FNMR the highest is returned.
    """
    gen, imp = _split(scores, labels)
    fmrs = np.atleast_1d(np.asarray(fmrs, np.float64))
    fnmr = np.full(len(fmrs), np.nan)
    thr = np.full(len(fmrs), np.nan)
    if len(gen) == 0 or len(imp) == 0:
        return fnmr, thr
    ok = np.array([measurable(f, len(imp)) for f in fmrs], dtype=bool)
    if ok.any():
        t, accepted = operating_points(gen, -np.sort(-imp), len(imp), fmrs[ok], strict=False)
        fnmr[ok] = (len(gen) - accepted) / len(gen)
        thr[ok] = t
    return fnmr, thr


def fnmr_at_fmr(
    scores: np.ndarray, labels: np.ndarray, fmrs: tuple[float, ...] | np.ndarray = REPORT_FMRS
) -> np.ndarray:
    """FNMR at each target FMR (ISO/IEC 19795-1); NaN where the data cannot measure it."""
    return operating_thresholds(scores, labels, fmrs)[0]


def eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Equal error rate: where FMR and FNMR cross on the ROC, interpolated linearly."""
    from sklearn.metrics import roc_curve

    gen, imp = _split(scores, labels)
    if len(gen) == 0 or len(imp) == 0:
        return math.nan
    y = np.r_[np.ones(len(gen)), np.zeros(len(imp))]
    fpr, tpr, _ = roc_curve(y, np.r_[gen, imp])
    fnr = 1.0 - tpr
    i = int(np.argmax(fnr <= fpr))  # first point where FNMR no longer exceeds FMR (i >= 1)
    d0, d1 = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
    t = d0 / (d0 - d1)
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (probability a genuine pair outscores an impostor pair)."""
    from sklearn.metrics import roc_auc_score

    gen, imp = _split(scores, labels)
    if len(gen) == 0 or len(imp) == 0:
        return math.nan
    return float(roc_auc_score(np.r_[np.ones(len(gen)), np.zeros(len(imp))], np.r_[gen, imp]))


def _accuracy_at(gen_sorted: np.ndarray, imp_sorted: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Share of correct decisions ("match" iff score > t) at each threshold."""
    genuine_hits = len(gen_sorted) - np.searchsorted(gen_sorted, thr, side="right")
    impostor_hits = np.searchsorted(imp_sorted, thr, side="right")
    return (genuine_hits + impostor_hits) / (len(gen_sorted) + len(imp_sorted))


def benchmark_accuracy(
    scores: np.ndarray, labels: np.ndarray, folds: int = 10, n_thresholds: int = 600
) -> dict[str, Any]:
    """LFW-style 10-fold accuracy: contiguous folds, best of 600 thresholds on the other folds.

    Returns ``accuracy`` and ``std`` (population std over folds) in percent, the per-fold
    accuracies (percent) and the thresholds chosen on each training split.
    """
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel()
    _split(s, y)
    if len(s) < folds:
        raise ValueError(f"benchmark accuracy needs at least {folds} pairs, got {len(s)}")
    grid = np.linspace(s.min(), s.max(), n_thresholds)
    accuracies, chosen = [], []
    for test in np.array_split(np.arange(len(s)), folds):
        train = np.ones(len(s), dtype=bool)
        train[test] = False
        st, yt = s[train], y[train]
        acc = _accuracy_at(np.sort(st[yt == 1]), np.sort(st[yt == 0]), grid)
        thr = grid[int(np.argmax(acc))]  # first best threshold
        accuracies.append(float(np.mean((s[test] > thr) == (y[test] == 1)) * 100.0))
        chosen.append(float(thr))
    return {
        "accuracy": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "fold_accuracies": accuracies,
        "fold_thresholds": chosen,
        "folds": folds,
    }


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def error_versus_discard(
    scores: np.ndarray,
    labels: np.ndarray,
    quality: np.ndarray,
    fmr: float = 1e-3,
    steps: tuple[float, ...] = DISCARD_STEPS,
) -> dict[str, Any]:
    """FNMR as the lowest-quality pairs are discarded (EDC), in two variants.

    Pairs are ordered by pair quality (lowest first; ties keep input order) and the first
    ``floor(r * n)`` are discarded at each step ``r``. ``fnmr_rederived`` re-derives the ISO
    threshold for ``fmr`` on the kept pairs; ``fnmr_fixed_threshold`` (with its measured
    ``fmr_fixed_threshold``) keeps the threshold of the 0 % step. None where unmeasurable.
    """
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel()
    q = np.asarray(quality, np.float64).ravel()
    if len(q) != len(s):
        raise ValueError(f"quality and scores differ in length: {len(q)} and {len(s)}")
    _split(s, y)
    order = np.argsort(q, kind="stable")
    fixed = float(operating_thresholds(s, y, [fmr])[1][0])
    out: dict[str, Any] = {
        "fmr": fmr,
        "discard": list(steps),
        "fixed_threshold": _none_if_nan(fixed),
        "kept_genuine": [],
        "kept_impostor": [],
        "fnmr_rederived": [],
        "fnmr_fixed_threshold": [],
        "fmr_fixed_threshold": [],
    }
    for r in steps:
        keep = order[int(math.floor(r * len(s) + 1e-9)) :]
        sk, yk = s[keep], y[keep]
        gen, imp = sk[yk == 1], sk[yk == 0]
        out["kept_genuine"].append(len(gen))
        out["kept_impostor"].append(len(imp))
        out["fnmr_rederived"].append(_none_if_nan(float(fnmr_at_fmr(sk, yk, [fmr])[0])))
        measurable = math.isfinite(fixed) and len(gen) and len(imp)
        out["fnmr_fixed_threshold"].append(float(np.mean(gen < fixed)) if measurable else None)
        out["fmr_fixed_threshold"].append(float(np.mean(imp >= fixed)) if measurable else None)
    return out


def _score_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    quality: np.ndarray,
    fmrs: tuple[float, ...],
    folds: int,
    edc_fmr: float,
) -> dict[str, Any]:
    fnmr, thr = operating_thresholds(scores, labels, fmrs)
    acc = benchmark_accuracy(scores, labels, folds)
    return {
        "fnmr_at_fmr": {
            fmr_key(f): float(v) for f, v in zip(fmrs, fnmr, strict=True) if math.isfinite(v)
        },
        "threshold_at_fmr": {
            fmr_key(f): float(t) for f, t in zip(fmrs, thr, strict=True) if math.isfinite(t)
        },
        "eer": eer(scores, labels),
        "auc": roc_auc(scores, labels),
        "accuracy": acc["accuracy"],
        "accuracy_std": acc["std"],
        "edc": error_versus_discard(scores, labels, quality, edc_fmr),
    }


def verification_report(
    cosine: np.ndarray,
    qmag_scores: np.ndarray,
    labels: np.ndarray,
    quality: np.ndarray,
    *,
    fmrs: tuple[float, ...] = REPORT_FMRS,
    folds: int = 10,
    edc_fmr: float = 1e-3,
) -> dict[str, Any]:
    """Cosine and QMagFace side by side on the same pairs; a JSON-serialisable dict."""
    y = np.asarray(labels).ravel()
    gen, imp = _split(cosine, y)
    _split(qmag_scores, y)
    return {
        "n_pairs": int(len(y)),
        "n_genuine": int(len(gen)),
        "n_impostor": int(len(imp)),
        "fmrs": [fmr_key(f) for f in fmrs],
        "scores": {
            "cosine": _score_metrics(cosine, y, quality, fmrs, folds, edc_fmr),
            "qmagface": _score_metrics(qmag_scores, y, quality, fmrs, folds, edc_fmr),
        },
        "conventions": {
            "fnmr_at_fmr": "ISO/IEC 19795-1: lowest FNMR among thresholds with FMR <= target; "
            "match iff score >= threshold; only FMRs >= 1/n_impostor are reported",
            "rates": "fractions (eer, auc, fnmr_at_fmr); accuracy and accuracy_std in percent",
            "accuracy": f"{folds} contiguous folds, best of 600 linear thresholds on the other "
            "folds, match iff score > threshold",
            "edc": "pairs discarded by lowest pair quality; fnmr_rederived re-derives the "
            "threshold at each step, fnmr_fixed_threshold keeps the 0% threshold",
        },
    }


def _pct(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100.0 * x:.{digits}f}"


def format_table(report: dict[str, Any], edc_points: tuple[float, ...] = (0.1, 0.2, 0.4)) -> str:
    """The report as a console table: one row per metric, cosine and QMagFace columns."""
    cos, qmf = report["scores"]["cosine"], report["scores"]["qmagface"]
    rows: list[tuple[str, str, str]] = []
    few = False
    for key in report["fmrs"]:
        # the false matches this FNMR rests on: FMR x impostor pairs (marked under 10)
        n_false = int(math.floor(float(key) * report["n_impostor"] + 1e-9))
        measured = key in cos["fnmr_at_fmr"] or key in qmf["fnmr_at_fmr"]
        mark = "*" if measured and n_false < 10 else ""
        few |= bool(mark)
        evidence = f" [{n_false}{mark} false matches]" if measured else ""
        rows.append(
            (
                f"FNMR % @ FMR {key}{evidence}",
                _pct(cos["fnmr_at_fmr"].get(key)),
                _pct(qmf["fnmr_at_fmr"].get(key)),
            )
        )
    rows.append(("EER %", _pct(cos["eer"]), _pct(qmf["eer"])))
    rows.append(("ROC AUC %", _pct(cos["auc"], 4), _pct(qmf["auc"], 4)))
    rows.append(
        (
            "Accuracy % (10-fold)",
            f"{cos['accuracy']:.2f} ± {cos['accuracy_std']:.2f}",
            f"{qmf['accuracy']:.2f} ± {qmf['accuracy_std']:.2f}",
        )
    )
    edc = cos["edc"]
    for r in edc_points:
        if r in edc["discard"]:
            i = edc["discard"].index(r)
            rows.append(
                (
                    f"FNMR % @ FMR {fmr_key(edc['fmr'])}, {r:.0%} discarded",
                    _pct(edc["fnmr_rederived"][i]),
                    _pct(qmf["edc"]["fnmr_rederived"][i]),
                )
            )
    width = max(len(r[0]) for r in rows)
    head = (
        f"{report['n_genuine']} genuine / {report['n_impostor']} impostor pairs\n"
        f"{'metric':<{width}}  {'cosine':>15}  {'QMagFace':>15}"
    )
    lines = [f"{name:<{width}}  {a:>15}  {b:>15}" for name, a, b in rows]
    if few:
        lines.append("* fewer than 10 false matches: that FNMR is a rough figure")
    return "\n".join([head, "-" * (width + 34), *lines])


#: FARs of the IJB-B / IJB-C 1:1 verification tables.
TEMPLATE_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: tuple[float, ...] | np.ndarray = TEMPLATE_FARS
) -> np.ndarray:
    """TAR at each FAR under the ISO convention of this module: ``1 - fnmr_at_fmr``.

    The threshold is the one with the lowest FNMR among those whose FAR is at most ``f``; NaN
    where the impostors cannot measure ``f`` (fewer than ``1 / f``).
    """
    return 1.0 - fnmr_at_fmr(scores, labels, fars)


def tar_at_far_nearest(
    scores: np.ndarray, labels: np.ndarray, fars: tuple[float, ...] | np.ndarray = TEMPLATE_FARS
) -> np.ndarray:
    """TAR at each FAR as InsightFace's published IJB-B/C tables compute it.

    Their evaluation takes scikit-learn's ROC (``roc_curve`` with its default dropping of
    collinear points), reverses it (highest FPR first) and reports the TPR of the first point
    whose FPR is nearest to ``f`` in absolute difference: among points at the same FPR, the
    highest TPR. The FAR actually achieved can exceed ``f`` (up to half the gap to the next ROC
    point), so these figures can be higher than :func:`tar_at_far`'s; on small sets a nearest
    point of FPR 0 gives the TPR of the strictest threshold. NaN without both classes.
    """
    from sklearn.metrics import roc_curve

    gen, imp = _split(scores, labels)
    fars = np.atleast_1d(np.asarray(fars, np.float64))
    if len(gen) == 0 or len(imp) == 0:
        return np.full(len(fars), np.nan)
    y = np.asarray(labels).ravel().astype(np.int8)
    fpr, tpr, _ = roc_curve(y, np.asarray(scores, np.float64).ravel())
    fpr, tpr = fpr[::-1], tpr[::-1]
    return np.array([tpr[int(np.argmin(np.abs(fpr - f)))] for f in fars])


def tar_table(
    scores: dict[str, np.ndarray],
    labels: np.ndarray,
    fars: tuple[float, ...] | np.ndarray = TEMPLATE_FARS,
) -> dict[str, Any]:
    """TAR at FAR per score under both conventions: ``{"iso": {name: {far: tar}}, "nearest": ...}``.

    Keys are ``fmr_key(f)`` strings; values fractions (None where not measurable).
    """
    out: dict[str, Any] = {"fars": [float(f) for f in fars], "iso": {}, "nearest": {}}
    for name, s in scores.items():
        iso, near = tar_at_far(s, labels, fars), tar_at_far_nearest(s, labels, fars)
        for conv, values in (("iso", iso), ("nearest", near)):
            out[conv][name] = {
                fmr_key(f): _none_if_nan(float(v)) for f, v in zip(fars, values, strict=True)
            }
    return out


def format_tar_table(table: dict[str, Any]) -> str:
    """The TAR@FAR table for a console: one row per FAR, both conventions, every score."""
    names = list(table["iso"])
    head = "TAR % @ FAR".ljust(14) + "".join(f"{n + ' ISO':>16}{n + ' nearest':>18}" for n in names)
    lines = [head]
    for f in table["fars"]:
        key = fmr_key(f)
        row = f"{key:<14}"
        for n in names:
            row += f"{_pct(table['iso'][n][key]):>16}{_pct(table['nearest'][n][key]):>18}"
        lines.append(row)
    lines.append(
        "ISO: best threshold with FAR <= f; nearest: the ROC point whose FAR is nearest to f "
        "(InsightFace's IJB tables)"
    )
    return "\n".join(lines)
