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

from qmag_ray.fmr import impostor_counts, operating_points, thresholds_at_bounds

__all__ = ["impostor_counts", "operating_points", "thresholds_at_bounds"]  # (from qmag_ray.fmr)


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
            f"cannot fit the line: all {len(t)} optimal thresholds are equal "
            f"({float(t[0])!r}); the data are too few or too coarse for this FMR range"
        )
    beta, intercept = np.polyfit(t, w, 1)
    alpha = -float(intercept)
    if not (math.isfinite(alpha) and math.isfinite(float(beta))):
        raise ValueError(f"the line fit gave non-finite parameters (alpha={alpha}, beta={beta})")
    return alpha, float(beta)
