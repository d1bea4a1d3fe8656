"""The exact threshold search of spec section 3 on impostor tails: the numpy core of calibration.

For a fixed candidate weight ``w`` every pair gets ``u = sigmoid(w * q + s)``. At a target FMR
``f`` the admissible thresholds are the distinct ``u`` values with FMR strictly below ``f``.
Sort the impostor scores in decreasing order, ``v_1 >= v_2 >= ...``: a threshold ``t`` lets at
most ``m`` impostors through iff ``t > v_(m+1)``. With ``m(f)`` the largest count whose rate
``m / N_impostor`` is below ``f``, the admissible threshold with the lowest FNMR is the lowest
one above ``v_(m+1)``, and among thresholds with that same FNMR the highest is the smallest
genuine score above ``v_(m+1)``. So only the ``m(fmr_max) + 1`` highest impostor scores and
the genuine scores decide the search (``tails`` collects them shard by shard).

Every ``u`` anywhere in the project (and in the test oracle) comes from ``weighted_scores``.
"""

from __future__ import annotations

import math

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, one fixed float64 formula (element-wise, position independent)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def weighted_logits(cosine: np.ndarray, quality: np.ndarray, weight: float) -> np.ndarray:
    """``w * q + s``, the argument of the sigmoid in step 1 of the algorithm."""
    return float(weight) * np.asarray(quality, np.float64) + np.asarray(cosine, np.float64)


def weighted_scores(cosine: np.ndarray, quality: np.ndarray, weight: float) -> np.ndarray:
    """``u = sigmoid(w * q + s)``: the score a candidate weight gives every pair."""
    return sigmoid(weighted_logits(cosine, quality, weight))


def operating_points(
    genuine: np.ndarray,
    impostor_desc: np.ndarray,
    n_impostor: int,
    fmrs: np.ndarray,
    *,
    strict: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Best threshold and number of accepted genuine pairs at each FMR (match iff score >= t).

    ``genuine``: all genuine scores, any order. ``impostor_desc``: the highest impostor scores
    in decreasing order (at least those the largest FMR needs, or all of them). ``strict``
    selects FMR < f (calibration, spec 3) or FMR <= f (ISO/IEC 19795-1, spec 4). Among the
    thresholds with the lowest FNMR the highest is returned: the smallest genuine score above
    the impostor bound. When no genuine score can be accepted it is the highest score overall,
    or NaN when no score value is admissible at all.
    """
    fmrs = np.atleast_1d(np.asarray(fmrs, np.float64))
    genuine = np.asarray(genuine, np.float64)
    n_tail = len(impostor_desc)
    if n_impostor <= 0:
        raise ValueError("operating points need at least one impostor score")
    # Impostor counts 0..n_tail and their rates exactly as a ROC curve computes them (c / N).
    rates = np.arange(n_tail + 1, dtype=np.float64) / float(n_impostor)
    m = np.searchsorted(rates, fmrs, side="left" if strict else "right") - 1
    if n_tail < n_impostor and (m >= n_tail).any():
        raise RuntimeError(
            f"impostor tail of {n_tail} scores is too short for FMR {fmrs.max():g} "
            f"on {n_impostor} impostors"
        )
    # A threshold t passes at most m impostors iff t > bound = the (m+1)-th highest impostor.
    bound = np.where(m < n_tail, impostor_desc[np.minimum(m, n_tail - 1)], -np.inf)
    # Only genuine scores between the lowest and highest bound need sorting; the ones above
    # are accepted at every FMR, the ones at or below the lowest bound nowhere.
    lo, hi = bound.min(), bound.max()
    high = genuine > hi
    n_high = int(high.sum())
    min_high = genuine[high].min() if n_high else np.nan
    mid = np.sort(genuine[(genuine > lo) & ~high])
    first = np.searchsorted(mid, bound, side="right")
    accepted = (len(mid) - first + n_high).astype(np.int64)
    top = impostor_desc[0] if n_tail else -np.inf
    fallback = np.where(top > bound, top, np.nan)
    above = np.where(n_high, min_high, fallback)
    if len(mid):
        thresholds = np.where(first < len(mid), mid[np.minimum(first, len(mid) - 1)], above)
    else:
        thresholds = above
    return thresholds.astype(np.float64), accepted


def search_weight(
    weight: float,
    tail_logits: np.ndarray,
    genuine_cosine: np.ndarray,
    genuine_quality: np.ndarray,
    n_impostor: int,
    fmrs: np.ndarray,
    *,
    raw: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 for one weight: per FMR, the threshold t(w, f) and the accepted genuine count.

    ``tail_logits`` are this weight's highest impostor logits, in any order. ``raw`` searches
    the raw adjusted score ``z = w * q + s`` itself instead of ``sigmoid(z)`` (the ``raw``
    calibration method): thresholds are then values of ``z``, on the scale ``omega`` is
    applied to. Searching ``z`` directly, rather than mapping the sigmoid-space thresholds
    back with ``logit``, is exact: float64 ``sigmoid`` can round neighbouring ``z`` values
    to one ``u`` (a tie the raw scores do not have) and ``logit(sigmoid(z)) != z`` in general.
    """
    if raw:
        impostor_desc = -np.sort(-np.asarray(tail_logits, np.float64))
        genuine = weighted_logits(genuine_cosine, genuine_quality, weight)
    else:
        impostor_desc = -np.sort(-sigmoid(tail_logits))
        genuine = weighted_scores(genuine_cosine, genuine_quality, weight)
    return operating_points(genuine, impostor_desc, n_impostor, fmrs, strict=True)


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
