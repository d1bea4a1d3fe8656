"""The exact threshold search of spec section 3 on impostor tails: the numpy core of calibration.

For a fixed candidate weight ``w`` every pair gets ``u = sigmoid(w * q + s)``. At a target FMR
``f`` the admissible thresholds are the distinct ``u`` values with FMR strictly below ``f``.
Sort the impostor scores in decreasing order, ``v_1 >= v_2 >= ...``: a threshold ``t`` lets at
most ``m`` impostors through iff ``t > v_(m+1)``. With ``m(f)`` the largest count whose rate
``m / N_impostor`` is below ``f``, the admissible threshold with the lowest FNMR is the lowest
one above ``v_(m+1)``, and among thresholds with that same FNMR the highest is the smallest
genuine score above ``v_(m+1)``. So only the ``m(fmr_max) + 1`` highest impostor scores (an
order statistic, whatever way ties are broken) and the genuine scores decide the search: a
shard keeps its own top impostor scores per weight, and merging shards' tops is exact.

The sigmoid is monotone, so the top impostors by ``u`` are the top impostors by the logit
``w * q + s``: tails are kept as logits and the sigmoid is applied to the few values kept.
Every ``u`` anywhere in the project (and in the test oracle) comes from ``weighted_scores``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from qmag_ray.pairs.source import PairBlock

_SAMPLE_STRIDE = 16


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, one fixed float64 formula (element-wise, position independent)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def weighted_logits(cosine: np.ndarray, quality: np.ndarray, weight: float) -> np.ndarray:
    """``w * q + s``, the argument of the sigmoid in step 1 of the algorithm."""
    return float(weight) * np.asarray(quality, np.float64) + np.asarray(cosine, np.float64)


def weighted_scores(cosine: np.ndarray, quality: np.ndarray, weight: float) -> np.ndarray:
    """``u = sigmoid(w * q + s)``: the score a candidate weight gives every pair."""
    return sigmoid(weighted_logits(cosine, quality, weight))


def tail_size(n_impostor: int, fmr_max: float) -> int:
    """How many of the highest impostor scores decide every threshold with FMR <= fmr_max.

    One more than ``floor(fmr_max * N)`` is needed; one extra guards float rounding of the rate.
    """
    return int(min(n_impostor, math.floor(fmr_max * n_impostor) + 2))


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest values (as a multiset, unsorted); all of them when there are fewer.

    On long inputs a strided sample first proposes a cut that keeps about ``2k`` values; the
    answer is exact either way (when fewer than ``k`` values pass the cut, all are searched).
    """
    values = np.asarray(values, np.float64)
    n = len(values)
    if n <= k:
        return values.copy()
    if k > 0 and n >= 8 * k and n >= 1 << 16:
        sample = values[::_SAMPLE_STRIDE]
        need = min(len(sample), 2 * (k // _SAMPLE_STRIDE) + 16)
        cut = np.partition(sample, len(sample) - need)[len(sample) - need]
        kept = values[values >= cut]
        if len(kept) >= k:  # every one of the k largest values is >= cut
            values, n = kept, len(kept)
    return np.partition(values, n - k)[n - k :].copy()


def _top_k_rows(values: np.ndarray, k: int) -> np.ndarray:
    n = values.shape[1]
    if n <= k:
        return values
    return np.partition(values, n - k, axis=1)[:, n - k :].copy()


@dataclass
class TailSummary:
    """What a shard (or a merge of shards) contributes to calibration.

    ``tails[i]`` holds the highest impostor logits ``weights[i] * q + s`` (unsorted, at most
    ``k``); the genuine pairs are kept whole as cosine and quality.
    """

    weights: np.ndarray
    k: int
    tails: np.ndarray  # (n_weights, min(k, n_impostor))
    genuine_cosine: np.ndarray
    genuine_quality: np.ndarray
    n_impostor: int

    @property
    def n_genuine(self) -> int:
        return len(self.genuine_cosine)

    @classmethod
    def empty(cls, weights: np.ndarray, k: int) -> TailSummary:
        weights = np.asarray(weights, np.float64)
        return cls(weights, k, np.empty((len(weights), 0)), np.empty(0), np.empty(0), 0)

    def nbytes(self) -> int:
        return int(self.tails.nbytes + self.genuine_cosine.nbytes + self.genuine_quality.nbytes)


def _add_impostors(summary: TailSummary, cosine: np.ndarray, quality: np.ndarray) -> None:
    """Fold a batch of impostor pairs into the running per-weight tails."""
    k, tails = summary.k, summary.tails
    full = tails.shape[1] >= k
    rows = []
    for i, w in enumerate(summary.weights):
        x = weighted_logits(cosine, quality, w)
        if full:  # only values above the current k-th largest can enter the tail
            x = x[x > tails[i].min()]
        rows.append(top_k(x, k))
    width = max(len(r) for r in rows)
    if width == 0:
        return
    # Rows may differ in length after the cut; pad with -inf, which never enters a full tail.
    new = np.full((len(rows), width), -np.inf)
    for i, r in enumerate(rows):
        new[i, : len(r)] = r
    summary.tails = _top_k_rows(np.concatenate([tails, new], axis=1), k)


def summarize_blocks(blocks: Iterable[PairBlock], weights: np.ndarray, k: int) -> TailSummary:
    """Stream pair blocks into a ``TailSummary``: memory is the tails plus the genuine pairs."""
    summary = TailSummary.empty(weights, k)
    gen_c: list[np.ndarray] = []
    gen_q: list[np.ndarray] = []
    for block in blocks:
        label = np.asarray(block.label)
        imp = label == 0
        cos = np.asarray(block.cosine, np.float64)
        q = np.asarray(block.quality, np.float64)
        gen_c.append(cos[~imp])
        gen_q.append(q[~imp])
        n_imp = int(imp.sum())
        if n_imp:
            summary.n_impostor += n_imp
            _add_impostors(summary, cos[imp], q[imp])
    if gen_c:
        summary.genuine_cosine = np.concatenate(gen_c)
        summary.genuine_quality = np.concatenate(gen_q)
    return summary


def merge_summaries(summaries: Iterable[TailSummary]) -> TailSummary:
    """Merge shard summaries; the result does not depend on their number or order."""
    merged: TailSummary | None = None
    for s in summaries:
        merged = s if merged is None else merge_two(merged, s)
    if merged is None:
        raise ValueError("no shard summaries to merge")
    return merged


def merge_two(a: TailSummary, b: TailSummary) -> TailSummary:
    """Merge two summaries built with the same weights and tail size."""
    if a.k != b.k or not np.array_equal(a.weights, b.weights):
        raise ValueError("cannot merge tail summaries built with different weights or tail size")
    tails = _top_k_rows(np.concatenate([a.tails, b.tails], axis=1), a.k)
    return TailSummary(
        weights=a.weights,
        k=a.k,
        tails=tails,
        genuine_cosine=np.concatenate([a.genuine_cosine, b.genuine_cosine]),
        genuine_quality=np.concatenate([a.genuine_quality, b.genuine_quality]),
        n_impostor=a.n_impostor + b.n_impostor,
    )


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
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 for one weight: per FMR, the threshold t(w, f) and the accepted genuine count.

    ``tail_logits`` are this weight's highest impostor logits, in any order.
    """
    impostor_desc = -np.sort(-sigmoid(tail_logits))
    genuine = weighted_scores(genuine_cosine, genuine_quality, weight)
    return operating_points(genuine, impostor_desc, n_impostor, fmrs, strict=True)


def search_all(summary: TailSummary, fmrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 for every weight of a merged summary: (thresholds, accepted), (n_weights, n_fmr)."""
    gen_c, gen_q, n_imp = summary.genuine_cosine, summary.genuine_quality, summary.n_impostor
    out = [
        search_weight(w, summary.tails[i], gen_c, gen_q, n_imp, fmrs)
        for i, w in enumerate(summary.weights)
    ]
    return np.stack([t for t, _ in out]), np.stack([a for _, a in out])


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
            "pairs above the genuine scores to measure it); raise fmr_min above this FMR"
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
