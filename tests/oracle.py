"""The published calibration algorithm, plainly and slowly: the parity oracle of the tests.

Spec section 3 step by step, with one ROC curve (scikit-learn's ``roc_curve``) per candidate
weight, as the original QMagFace code computes it. Written from the spec; deliberate details:

- ``u = 1 / (1 + exp(-(w * q + s)))`` in float64, written here (the oracle imports nothing
  from ``qmag_ray``, see ``test_oracles.py``); the product is expected to evaluate the same
  formula, so both sides see bit-identical scores and parity is checked to 1e-9.
- ``raw=True`` is the ``raw`` method: the same search on ``w * q + s`` itself.
- The ROC's extra first point (threshold +inf, nothing accepted) is not a candidate: the spec's
  candidates are observed score values. The original code could pick it only where FNMR is 1
  at every weight, which would give an infinite threshold; here that is an error.
- ``drop_intermediate=False`` (default) enumerates every distinct score, literally the spec;
  ``True`` is scikit-learn's (and the original code's) default. They choose the same points
  unless genuine and impostor scores tie exactly.
- The line is fitted with ``np.polyfit``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve


def oracle_sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def oracle_scores(cosine: np.ndarray, quality: np.ndarray, w: float, *, raw: bool = False):
    """Step 1: ``u = sigmoid(w * q + s)`` (``raw``: ``w * q + s``)."""
    z = float(w) * np.asarray(quality, np.float64) + np.asarray(cosine, np.float64)
    return z if raw else oracle_sigmoid(z)


def oracle_grid(
    quality: np.ndarray,
    n_fmr: int,
    fmr_min: float,
    fmr_max: float,
    n_weights: int,
    max_ratio: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate weights and the FMR values of the published grid."""
    m = max_ratio / np.max(quality)
    weights = np.linspace(-m, m, n_weights)
    fmrs = np.logspace(np.log10(fmr_min), np.log10(fmr_max), n_fmr)
    return weights, fmrs


def oracle_search(
    cosine: np.ndarray,
    quality: np.ndarray,
    label: np.ndarray,
    weights: np.ndarray,
    fmrs: np.ndarray,
    *,
    drop_intermediate: bool = False,
    raw: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-2: per weight and FMR, the chosen threshold and its FNMR (NaN/1 if none)."""
    thr_table = np.full((len(weights), len(fmrs)), np.nan)
    fnmr_table = np.ones((len(weights), len(fmrs)))
    for i, w in enumerate(weights):
        u = oracle_scores(cosine, quality, w, raw=raw)
        fpr, tpr, thr = roc_curve(label, u, drop_intermediate=drop_intermediate)
        fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the +inf starting point
        for j, f in enumerate(fmrs):
            below = fpr < f  # a prefix: thresholds decrease along the curve
            if not below.any():
                continue
            fnmr = 1.0 - tpr[below]
            best = int(np.argmin(fnmr))  # first minimum = highest threshold among ties
            thr_table[i, j] = thr[best]
            fnmr_table[i, j] = fnmr[best]
    return thr_table, fnmr_table


def oracle_fit(
    cosine: np.ndarray,
    quality: np.ndarray,
    label: np.ndarray,
    *,
    n_fmr: int = 50,
    fmr_min: float = 1e-5,
    fmr_max: float = 1e-2,
    n_weights: int = 20,
    max_ratio: float = 0.5,
    drop_intermediate: bool = False,
    raw: bool = False,
) -> dict[str, np.ndarray | float]:
    """Steps 1-4; returns alpha, beta and the intermediate tables."""
    cosine = np.asarray(cosine, np.float64)
    quality = np.asarray(quality, np.float64)
    weights, fmrs = oracle_grid(quality, n_fmr, fmr_min, fmr_max, n_weights, max_ratio)
    thr, fnmr = oracle_search(
        cosine, quality, label, weights, fmrs, drop_intermediate=drop_intermediate, raw=raw
    )
    w_opt = np.empty(n_fmr)
    t_opt = np.empty(n_fmr)
    for j in range(n_fmr):
        best = int(np.argmin(fnmr[:, j]))  # first in grid order on ties
        if fnmr[best, j] >= 1.0:
            raise ValueError(f"oracle: no usable threshold at FMR {fmrs[j]:g}")
        w_opt[j] = weights[best]
        t_opt[j] = thr[best, j]
    beta, intercept = np.polyfit(t_opt, w_opt, 1)
    return {
        "alpha": float(-intercept),
        "beta": float(beta),
        "weights": weights,
        "fmrs": fmrs,
        "optimal_weights": w_opt,
        "optimal_thresholds": t_opt,
        "thresholds": thr,
        "fnmr_table": fnmr,
    }


def oracle_fnmr_at_fmr(scores: np.ndarray, label: np.ndarray, fmrs) -> np.ndarray:
    """ISO/IEC 19795-1 FNMR at FMR <= f (match iff score >= t) from scikit-learn's ROC; NaN
    where fewer than one false match is possible (f < 1 / N_impostor)."""
    label = np.asarray(label)
    n_imp = int((label == 0).sum())
    fpr, tpr, _ = roc_curve(label, np.asarray(scores, np.float64), drop_intermediate=False)
    out = []
    for f in np.atleast_1d(fmrs):
        ok = fpr <= f
        out.append(float(np.min(1.0 - tpr[ok])) if f * n_imp >= 1 - 1e-9 else np.nan)
    return np.array(out)


def oracle_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two embedding arrays, written out."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(axis=1) / (np.sqrt((a * a).sum(axis=1)) * np.sqrt((b * b).sum(axis=1)))


def oracle_qmagface(cosine: np.ndarray, quality: np.ndarray, alpha: float, beta: float):
    """Spec section 2: ``min(0, beta * s - alpha) * q + s`` (q: the lower of the two norms)."""
    s = np.asarray(cosine, np.float64)
    return np.minimum(0.0, beta * s - alpha) * np.asarray(quality, np.float64) + s


def oracle_pair_scores(a: np.ndarray, b: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """QMagFace scores of row-wise pairs of unnormalised embeddings."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    q = np.minimum(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    return oracle_qmagface(oracle_cosine(a, b), q, alpha, beta)
