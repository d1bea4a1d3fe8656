"""The exact threshold search of spec section 3 on impostor order statistics (numpy core).

For a fixed candidate weight ``w`` every pair gets ``u = sigmoid(w * q + s)``. At a target FMR
``f`` the admissible thresholds are the distinct ``u`` values with FMR strictly below ``f``.
Sort the impostor scores in decreasing order, ``v_1 >= v_2 >= ...``: a threshold ``t`` lets at
most ``m`` impostors through iff ``t > v_(m+1)``. With ``m(f)`` the largest count whose rate
``m / N_impostor`` is below ``f``, the admissible threshold with the lowest FNMR is the lowest
one above ``v_(m+1)``, and among thresholds with that same FNMR the highest is the smallest
genuine score above ``v_(m+1)``. So only the order statistics ``v_(m(f)+1)`` (and ``v_1``, the
fallback) and the genuine scores decide the search; ``orderstats`` finds them exactly.

Every ``u`` anywhere in the project (and in the test oracle) comes from ``weighted_scores``.
"""

from __future__ import annotations

import math

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, one fixed float64 formula (element-wise, position independent)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def weighted_logits(
    cosine: np.ndarray, quality: np.ndarray, weight: float, out: np.ndarray | None = None
) -> np.ndarray:
    """``w * q + s``, the argument of the sigmoid in step 1 of the algorithm (into ``out``,
    a float64 buffer of the same length, when given: the same two roundings)."""
    x = np.multiply(np.asarray(quality, np.float64), float(weight), out=out)
    x += np.asarray(cosine, np.float64)
    return x


def weighted_scores(cosine: np.ndarray, quality: np.ndarray, weight: float) -> np.ndarray:
    """``u = sigmoid(w * q + s)``: the score a candidate weight gives every pair."""
    return sigmoid(weighted_logits(cosine, quality, weight))


def impostor_counts(n_impostor: int, fmrs: np.ndarray, *, strict: bool) -> np.ndarray:
    """Per FMR ``f``, the most impostors ``m`` a threshold may pass: the largest ``m`` in
    ``0..N`` whose rate ``m / N`` (as a ROC curve computes it) is below ``f`` (``strict``) or
    at most ``f``. Float comparisons exactly as ``searchsorted`` on the rates would make."""
    if n_impostor <= 0:
        raise ValueError("operating points need at least one impostor score")
    fmrs = np.atleast_1d(np.asarray(fmrs, np.float64))
    n = float(n_impostor)
    m = np.clip(np.floor(fmrs * n).astype(np.int64), 0, n_impostor)

    def ok(c: np.ndarray) -> np.ndarray:
        rate = c.astype(np.float64) / n
        return rate < fmrs if strict else rate <= fmrs

    for _ in range(4):  # floor(f * N) is within one of the answer; settle it exactly
        m = np.where((m > 0) & ~ok(m), m - 1, m)
        m = np.where((m < n_impostor) & ok(np.minimum(m + 1, n_impostor)), m + 1, m)
    return m


def wanted_ranks(m: np.ndarray, n_impostor: int) -> np.ndarray:
    """The impostor ranks (1 = highest) that decide thresholds passing at most ``m``: the
    ``(m + 1)``-th highest of each, and the highest (the fallback threshold)."""
    m = np.asarray(m, np.int64)
    return np.unique(np.r_[1, m[m < n_impostor] + 1])


def rank_values(values: np.ndarray, ranks: np.ndarray, m: np.ndarray, n_impostor: int):
    """(bound per FMR, highest impostor) from order statistics ``values`` at ``ranks``: the
    bound is the ``(m + 1)``-th highest impostor score, -inf where every impostor may pass."""
    m = np.asarray(m, np.int64)
    some = m < n_impostor
    pos = np.searchsorted(ranks, np.where(some, m + 1, 1))
    bound = np.where(some, np.asarray(values)[pos], -np.inf)
    return bound, float(np.asarray(values)[0])


def thresholds_at_bounds(
    genuine: np.ndarray, bound: np.ndarray, top: float
) -> tuple[np.ndarray, np.ndarray]:
    """Best threshold and number of accepted genuine pairs for impostor bounds (match iff
    score >= t).

    A threshold ``t`` passes at most ``m`` impostors iff ``t > bound``, the ``(m + 1)``-th
    highest impostor score. Among the thresholds with the lowest FNMR the highest is returned:
    the smallest genuine score above the bound. When no genuine score can be accepted it is the
    highest impostor score ``top`` if that is above the bound, else NaN (no admissible value).
    """
    genuine = np.asarray(genuine, np.float64)
    bound = np.asarray(bound, np.float64)
    # Only genuine scores between the lowest and highest bound need sorting; the ones above
    # are accepted at every FMR, the ones at or below the lowest bound nowhere.
    lo, hi = bound.min(), bound.max()
    high = genuine > hi
    n_high = int(high.sum())
    min_high = genuine[high].min() if n_high else np.nan
    mid = np.sort(genuine[(genuine > lo) & ~high])
    first = np.searchsorted(mid, bound, side="right")
    accepted = (len(mid) - first + n_high).astype(np.int64)
    fallback = np.where(top > bound, top, np.nan)
    above = np.where(n_high, min_high, fallback)
    if len(mid):
        thresholds = np.where(first < len(mid), mid[np.minimum(first, len(mid) - 1)], above)
    else:
        thresholds = above
    return thresholds.astype(np.float64), accepted


def operating_points(
    genuine: np.ndarray,
    impostor_desc: np.ndarray,
    n_impostor: int,
    fmrs: np.ndarray,
    *,
    strict: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Best threshold and accepted genuine count per FMR from ALL impostor scores, sorted in
    decreasing order (in-memory metrics). ``strict``: FMR < f (calibration, spec 3) or
    FMR <= f (ISO/IEC 19795-1, spec 4)."""
    impostor_desc = np.asarray(impostor_desc, np.float64)
    if len(impostor_desc) != n_impostor:
        raise ValueError(f"need all {n_impostor} impostor scores, got {len(impostor_desc)}")
    m = impostor_counts(n_impostor, fmrs, strict=strict)
    bound = np.where(m < n_impostor, impostor_desc[np.minimum(m, n_impostor - 1)], -np.inf)
    return thresholds_at_bounds(genuine, bound, float(impostor_desc[0]))


def search_weight(
    weight: float,
    bound_logits: np.ndarray,
    top_logit: float,
    genuine_cosine: np.ndarray,
    genuine_quality: np.ndarray,
    *,
    raw: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 for one weight: per FMR, the threshold t(w, f) and the accepted genuine count.

    ``bound_logits``: per FMR the ``(m + 1)``-th highest impostor logit (-inf where none),
    ``top_logit`` the highest (``orderstats``). The sigmoid is monotone, so the order statistic
    of ``u`` is the sigmoid of the logit's. ``raw`` searches the raw adjusted score
    ``z = w * q + s`` itself instead of ``sigmoid(z)`` (the ``raw`` calibration method):
    thresholds are then values of ``z``, on the scale ``omega`` is applied to. Searching ``z``
    directly, rather than mapping the sigmoid-space thresholds back with ``logit``, is exact:
    float64 ``sigmoid`` can round neighbouring ``z`` values to one ``u`` (a tie the raw scores
    do not have) and ``logit(sigmoid(z)) != z`` in general.
    """
    bound_logits = np.asarray(bound_logits, np.float64)
    if raw:
        bound, top = bound_logits, float(top_logit)
        genuine = weighted_logits(genuine_cosine, genuine_quality, weight)
    else:
        finite = np.isfinite(bound_logits)
        bound = np.where(finite, sigmoid(np.where(finite, bound_logits, 0.0)), -np.inf)
        top = float(sigmoid(np.array([top_logit]))[0])
        genuine = weighted_scores(genuine_cosine, genuine_quality, weight)
    return thresholds_at_bounds(genuine, bound, top)


def select_optimal(
    weights: np.ndarray,
    thresholds: np.ndarray,
    accepted: np.ndarray,
    n_genuine: int,
    fmrs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 3: per FMR the weight with the lowest FNMR (first in grid order on ties).

    Returns (index of the optimal weight, optimal weight, its threshold) per FMR. An FMR at
    which no weight has a threshold accepting any genuine pair is an error: the line would be
    fitted to a point at infinity.
    """
    misses = n_genuine - accepted
    best = np.argmin(misses, axis=0)
    cols = np.arange(len(fmrs))
    hopeless = misses[best, cols] >= n_genuine
    if hopeless.any():
        f = float(fmrs[np.flatnonzero(hopeless)[0]])
        raise ValueError(
            f"no threshold exists for FMR {f:.3g}: at every candidate weight, each threshold "
            f"with FMR below {f:.3g} rejects all {n_genuine} genuine pairs (too few impostor "
            "pairs above the genuine scores to measure it); raise --fmr-min (grid.fmr_min) above "
            "this FMR or give more impostor pairs (--impostors-per-side)"
        )
    return best, np.asarray(weights)[best], thresholds[best, cols]


def fit_line(thresholds: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Step 4: least squares ``w_opt = beta * t_opt - alpha``; returns (alpha, beta)."""
    t = np.asarray(thresholds, np.float64)
    w = np.asarray(weights, np.float64)
    if not np.isfinite(t).all():
        raise ValueError("cannot fit the line: some optimal thresholds are not finite")
    if np.ptp(t) == 0:
        raise ValueError(
            f"cannot fit the line: all {len(t)} optimal thresholds are equal ({t[0]!r}); the "
            "data are too few or too coarse for this FMR range"
        )
    beta, intercept = np.polyfit(t, w, 1)
    alpha = -float(intercept)
    if not (math.isfinite(alpha) and math.isfinite(float(beta))):
        raise ValueError(f"the line fit gave non-finite parameters (alpha={alpha}, beta={beta})")
    return alpha, float(beta)
