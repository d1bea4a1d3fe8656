"""Impostor tails: the few highest impostor scores that decide every threshold, per shard.

For FMRs up to ``fmr_max`` only the ``floor(fmr_max * N_impostor) + 1`` highest impostor scores
matter (see ``search``). Their multiset is an order statistic, the same whichever way ties are
broken, so shards keep their own top values and a merge of tops is the exact top of the whole.
Tails are kept as logits ``w * q + s`` (the sigmoid is monotone and applied later to the few
values kept). Memory is the tails plus the genuine pairs, never the number of pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmag_ray.calibration.search import weighted_logits
from qmag_ray.pairs.source import PairBlock
from qmag_ray.scores import qmagface_score

_SAMPLE_STRIDE = 16
#: Pairs processed at a time inside a block (bounds the float64 temporaries to ~50 MB).
CHUNK = 1 << 20


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


class TopK:
    """Streaming top-``k``: values at or below the current k-th largest are dropped on arrival,
    candidates are buffered and compacted when the buffer reaches ``k / 4`` (amortised O(1))."""

    def __init__(self, k: int) -> None:
        self.k = int(k)
        self.kept = np.empty(0)
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.cut = -np.inf

    def add(self, values: np.ndarray) -> None:
        if self.cut > -np.inf:
            values = values[values > self.cut]
        if len(values) == 0 or self.k == 0:
            return
        values = top_k(values, self.k)
        self.pending.append(values)
        self.n_pending += len(values)
        if self.n_pending >= max(self.k // 4, 1):
            self._compact()

    def _compact(self) -> None:
        if self.pending:
            self.kept = top_k(np.concatenate([self.kept, *self.pending]), self.k)
            self.pending, self.n_pending = [], 0
            if len(self.kept) >= self.k:
                self.cut = float(self.kept.min())

    def values(self) -> np.ndarray:
        """The top values so far (unsorted)."""
        self._compact()
        return self.kept


@dataclass
class TailSummary:
    """What a shard (or a merge of shards) contributes to calibration.

    ``tails[i]`` holds the highest impostor logits ``weights[i] * q + s`` (unsorted, exactly
    ``min(k, n_impostor)``), one array per weight so that rows move and merge one at a time;
    the genuine pairs are kept whole as cosine and quality.
    """

    weights: np.ndarray
    k: int
    tails: list[np.ndarray]
    genuine_cosine: np.ndarray
    genuine_quality: np.ndarray
    n_impostor: int

    @property
    def n_genuine(self) -> int:
        return len(self.genuine_cosine)

    @classmethod
    def empty(cls, weights: np.ndarray, k: int) -> TailSummary:
        weights = np.asarray(weights, np.float64)
        return cls(weights, k, [np.empty(0) for _ in weights], np.empty(0), np.empty(0), 0)


def _chunks(blocks: Iterable[PairBlock]) -> Iterator[PairBlock]:
    """Blocks cut to at most ``CHUNK`` pairs, so float64 temporaries stay small."""
    for block in blocks:
        n = len(block.cosine)
        if n <= CHUNK:
            yield block
            continue
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            yield PairBlock(block.cosine[a:b], block.quality[a:b], block.label[a:b])


def summarize_blocks(
    blocks: Iterable[PairBlock],
    weights: np.ndarray,
    k: int,
    score: Callable[[np.ndarray, np.ndarray, Any], np.ndarray] = weighted_logits,
) -> TailSummary:
    """Stream pair blocks into a ``TailSummary``: per-weight impostor tails, genuine pairs.

    ``score(cosine, quality, weight)`` gives the impostor scores under one weight (the paper's
    weighted logits by default); the direct fit passes its own score for ``(alpha, beta)`` rows.
    """
    weights = np.asarray(weights, np.float64)
    tops = [TopK(k) for _ in weights]
    gen_c: list[np.ndarray] = []
    gen_q: list[np.ndarray] = []
    n_imp = 0
    for block in _chunks(blocks):
        imp = np.asarray(block.label) == 0
        cos = np.asarray(block.cosine, np.float64)
        q = np.asarray(block.quality, np.float64)
        gen_c.append(cos[~imp])
        gen_q.append(q[~imp])
        if imp.any():
            n_imp += int(imp.sum())
            cos_i, q_i = cos[imp], q[imp]
            for w, top in zip(weights, tops, strict=True):
                top.add(score(cos_i, q_i, w))
    summary = TailSummary.empty(weights, k)
    summary.n_impostor = n_imp
    summary.tails = [top.values() for top in tops]
    if gen_c:
        summary.genuine_cosine = np.concatenate(gen_c)
        summary.genuine_quality = np.concatenate(gen_q)
    return summary


def merge_into(a: TailSummary, b: TailSummary) -> TailSummary:
    """Merge ``b`` into ``a`` in place (same weights and tail size) and return ``a``.

    Rows are merged one at a time and each of ``a``'s rows is replaced as soon as its merge is
    done, so a running merge needs memory for one extra row, not a second set of tails.
    """
    if a.k != b.k or not np.array_equal(a.weights, b.weights):
        raise ValueError("cannot merge tail summaries built with different weights or tail size")
    for i in range(len(a.tails)):
        a.tails[i] = top_k(np.concatenate([a.tails[i], b.tails[i]]), a.k)
    a.genuine_cosine = np.concatenate([a.genuine_cosine, b.genuine_cosine])
    a.genuine_quality = np.concatenate([a.genuine_quality, b.genuine_quality])
    a.n_impostor += b.n_impostor
    return a


def impostor_score_tail(
    blocks: Iterable[PairBlock], alpha: float, beta: float, k: int
) -> tuple[np.ndarray, int]:
    """The ``k`` highest impostor QMagFace scores of a stream of blocks, and the impostor count."""
    top = TopK(k)
    n = 0
    for block in _chunks(blocks):
        imp = np.asarray(block.label) == 0
        if imp.any():
            n += int(imp.sum())
            cos = np.asarray(block.cosine, np.float64)[imp]
            top.add(qmagface_score(cos, np.asarray(block.quality, np.float64)[imp], alpha, beta))
    return top.values(), n
