"""Exact top-k search of probes against a gallery, by cosine and by the QMagFace score (numpy).

Scores are computed in blocks of ``probe_block x gallery_block`` (float32 matrix products of
unit vectors, one BLAS sgemm per block, sized so a block of scores stays in cache), so memory
stays bounded whatever the gallery size. The QMagFace score of a probe ``p`` and a gallery
entry ``g`` is ``s + min(0, beta * s - alpha) * min(q_p, q_g)`` with ``q`` the quality (by
default the embedding norm; any non-negative per-entry quality can be given): its order differs
from cosine's because the quality term differs per candidate, so both rankings are searched
exactly, not re-ranked from cosine's list.

Each probe keeps a running top-k list per score while the gallery blocks pass in order. Once a
list is full, only entries that can still enter it are looked at: for cosine those above the
current k-th score; for QMagFace those whose cosine is above the smallest cosine that could
reach the k-th QMagFace score (the score falls as the quality rises, so the block's lowest
quality bounds it; see ``qmagface_floor``). The block is compared once against these
thresholds, the few survivors are scored exactly and merged; only the first block of each probe
block is ranked in full (``argpartition``).

Ties are broken by the lower gallery index, and block boundaries are fixed multiples of
``gallery_block`` counted from the start of the whole gallery, so the lists are identical
however the gallery is cut into shards (shards hold whole blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROBE_BLOCK = 1024
GALLERY_BLOCK = 4096
METHODS = ("cosine", "qmagface")


@dataclass(frozen=True, eq=False)
class TopK:
    """Per probe, the ``k`` best gallery entries, best first.

    Attributes:
        index: (P, k) int64 gallery row (global); -1 where the gallery has fewer than k rows.
        score: (P, k) float32 scores; -inf where ``index`` is -1.
    """

    index: np.ndarray
    score: np.ndarray


def row_norms(x: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """float32 L2 norms of the rows, accumulated in float64 ``chunk`` rows at a time."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty(len(x), np.float32)
    for s in range(0, len(x), chunk):
        part = x[s : s + chunk]
        out[s : s + chunk] = np.sqrt(np.einsum("ij,ij->i", part, part, dtype=np.float64))
    return out


def unit_rows(
    x: np.ndarray, order: np.ndarray | None = None, chunk: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 unit rows, float32 norms) of raw embeddings (of ``x[order]`` when given, without
    a copy of the gathered rows); zero rows stay zero.

    Norms accumulate in float64, ``chunk`` rows at a time (no float64 copy of the whole
    array); every row's result is the same whatever the chunking or the order.
    """
    x = np.asarray(x, dtype=np.float32)
    n = len(x) if order is None else len(order)
    unit = np.empty((n, x.shape[1]), np.float32)
    norm = np.empty(n, np.float32)
    for s in range(0, n, chunk):
        part = x[s : s + chunk] if order is None else x[order[s : s + chunk]]
        n64 = np.sqrt(np.einsum("ij,ij->i", part, part, dtype=np.float64))
        safe = np.where(n64 > 0, n64, 1.0).astype(np.float32)
        np.divide(part, safe[:, None], out=unit[s : s + chunk])
        norm[s : s + chunk] = n64
    return unit, norm


def select_topk(score: np.ndarray, index: np.ndarray, k: int) -> TopK:
    """The ``k`` best columns of each row of ``score`` (ties: lower ``index`` first), exactly.

    Args:
        score: (P, n) candidate scores.
        index: (n,) or (P, n) global gallery index of each column.
        k: list length; rows with fewer than ``k`` candidates are padded with -1 / -inf.
    """
    p, n = score.shape
    index = np.broadcast_to(np.asarray(index, dtype=np.int64), (p, n))
    if n > k:
        part = np.argpartition(-score, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(score, part, axis=1)
        kth = vals.min(axis=1)
        # rows where ties at the k-th value were cut arbitrarily: redo them by (score, index)
        n_tied = (score == kth[:, None]).sum(axis=1)
        n_kept = (vals == kth[:, None]).sum(axis=1)
        for r in np.flatnonzero(n_tied > n_kept):
            cand = np.flatnonzero(score[r] >= kth[r])
            order = np.lexsort((index[r, cand], -score[r, cand]))[:k]
            part[r] = cand[order]
        idx = np.take_along_axis(index, part, axis=1)
        vals = np.take_along_axis(score, part, axis=1)
    else:
        idx, vals = index.copy(), score.copy()
    order = np.lexsort((idx, -vals), axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = np.concatenate([idx, np.full((p, pad), -1, np.int64)], axis=1)
        vals = np.concatenate([vals, np.full((p, pad), -np.inf, vals.dtype)], axis=1)
    return TopK(idx.astype(np.int64), vals.astype(np.float32))


def merge_topk(parts: list[TopK], k: int) -> TopK:
    """Merge per-shard lists of the same probes into the global top ``k`` (exact)."""
    idx = np.concatenate([t.index for t in parts], axis=1)
    score = np.concatenate([t.score for t in parts], axis=1)
    # padding (-1, -inf) sorts last; give it a large index so real entries win ties
    key = np.where(idx < 0, np.iinfo(np.int64).max, idx)
    order = np.lexsort((key, -score), axis=1)[:, :k]
    return TopK(np.take_along_axis(idx, order, 1), np.take_along_axis(score, order, 1))


def qmagface_block(
    cos: np.ndarray, q_probe: np.ndarray, q_gallery: np.ndarray, alpha: float, beta: float
) -> np.ndarray:
    """``s + min(0, beta s - alpha) * min(q_p, q_g)`` for a (P, G) block of cosines."""
    q = np.minimum(q_probe[:, None], q_gallery[None, :])
    adj = np.minimum(np.float32(0.0), np.float32(beta) * cos - np.float32(alpha))
    adj *= q
    adj += cos
    return adj


def qmagface_values(cos: np.ndarray, q: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """The QMagFace score of cosines ``cos`` at pair qualities ``q`` (float32, elementwise,
    the same operations as ``qmagface_block``, so the same bits)."""
    adj = np.minimum(np.float32(0.0), np.float32(beta) * cos - np.float32(alpha))
    adj *= q
    adj += cos
    return adj


def qmagface_floor(
    kth: np.ndarray, q_low: np.ndarray, alpha: float, beta: float
) -> np.ndarray | None:
    """Per row, a cosine below which no entry reaches the QMagFace score ``kth``.

    With ``q >= q_low >= 0`` the score ``min(s, s + (beta s - alpha) q)`` is at most its value
    at ``q_low``, which rises with ``s`` when ``1 + beta q_low > 0``; so an entry can beat
    ``kth`` only if ``s > max(kth, (kth + alpha q_low) / (1 + beta q_low))``. The floor is
    lowered by a margin that covers float32 rounding (survivors are scored exactly). None when
    the bound does not hold (a slope <= 0): every entry is then scored.
    """
    q_low = q_low.astype(np.float64)
    slope = 1.0 + beta * q_low
    if (q_low < 0).any() or (slope <= 1e-6).any():
        return None
    kth = kth.astype(np.float64)
    floor = np.maximum(kth, (kth + alpha * q_low) / slope)
    margin = 1e-5 * (1.0 + (abs(alpha) + abs(beta)) * q_low) / np.minimum(1.0, slope)
    return floor - margin


class _Running:
    """Per probe of a probe block, the running top-k list of one score, best first."""

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.index = np.full((n, k), -1, np.int64)
        self.score = np.full((n, k), -np.inf, np.float32)
        self.full = False

    @property
    def kth(self) -> np.ndarray:
        return self.score[:, -1]

    def merge_block(self, score: np.ndarray, index: np.ndarray) -> None:
        """Merge a dense block of scores; ``index`` is the global gallery row of each column.

        A full list takes only scores above its k-th (an equal score has a higher index and
        loses the tie); otherwise the block's own k-th best score (``np.partition``: values
        only, much faster than ``argpartition``) bounds the candidates, ties included.
        """
        if self.full:
            floor = self.kth
            rows, cols = np.nonzero(score > floor[:, None])
        elif score.shape[1] > self.k:
            floor = np.partition(score, score.shape[1] - self.k, axis=1)[:, -self.k]
            rows, cols = np.nonzero(score >= floor[:, None])
        else:
            rows, cols = np.nonzero(np.ones(score.shape, dtype=bool))
        self.merge_sparse(rows, index[cols], score[rows, cols])

    def merge_sparse(self, rows: np.ndarray, index: np.ndarray, score: np.ndarray) -> None:
        """Merge candidates (row, global gallery index, score), exactly (ties: lower index)."""
        if len(rows):
            touched = np.unique(rows)
            k = self.k
            all_rows = np.concatenate([np.repeat(touched, k), rows])
            all_index = np.concatenate([self.index[touched].ravel(), index])
            all_score = np.concatenate([self.score[touched].ravel(), score])
            # padding (-1, -inf) sorts after every real entry
            key = np.where(all_index < 0, np.iinfo(np.int64).max, all_index)
            order = np.lexsort((key, -all_score, all_rows))
            starts = np.searchsorted(all_rows[order], touched)
            take = order[(starts[:, None] + np.arange(k)[None, :]).ravel()]
            self.index[touched] = all_index[take].reshape(-1, k)
            self.score[touched] = all_score[take].reshape(-1, k)
        self.full = bool((self.index[:, -1] >= 0).all())


BANDS = 8
"""Quality bands per gallery block: each has its own QMagFace cosine floor."""


def quality_order(quality: np.ndarray, gallery_block: int = GALLERY_BLOCK) -> np.ndarray:
    """The permutation that sorts each ``gallery_block`` rows by quality (stable), block by
    block: rows never leave their block, so it is the same whatever the sharding, and the
    quality bands of a block (``BANDS`` slices of it) each have a narrow quality range."""
    quality = np.asarray(quality)
    order = np.empty(len(quality), np.int64)
    for g0 in range(0, len(quality), gallery_block):
        part = quality[g0 : g0 + gallery_block]
        order[g0 : g0 + len(part)] = g0 + np.argsort(part, kind="stable")
    return order


def search_block_range(
    probes: np.ndarray,
    q_probe: np.ndarray,
    gallery: np.ndarray,
    q_gallery: np.ndarray,
    offset: int,
    k: int,
    alpha: float,
    beta: float,
    *,
    gallery_index: np.ndarray | None = None,
    probe_block: int = PROBE_BLOCK,
    gallery_block: int = GALLERY_BLOCK,
) -> dict[str, TopK]:
    """Top ``k`` of every probe within gallery rows ``offset .. offset + len(gallery)``.

    ``probes`` and ``gallery`` are float32 unit rows, ``q_probe`` and ``q_gallery`` their
    qualities; ``offset`` must be a multiple of ``gallery_block`` (so blocks line up with the
    whole gallery's and every score is computed by the same block product whatever the
    sharding). ``gallery_index`` is the global row of each gallery row (default ``offset +
    0, 1, ...``); it may permute rows only within their block (``quality_order`` does, for
    tighter QMagFace floors). Gallery blocks are taken in order, which the strict thresholds
    rely on (a later block's rows have higher indices and lose ties).
    """
    if offset % gallery_block:
        raise ValueError(f"offset {offset} is not a multiple of the gallery block {gallery_block}")
    probes = np.asarray(probes, np.float32)
    gallery = np.asarray(gallery, np.float32)
    q_probe = np.asarray(q_probe, np.float32)
    q_gallery = np.asarray(q_gallery, np.float32)
    n_p, n_g = len(probes), len(gallery)
    if gallery_index is None:
        gallery_index = np.arange(offset, offset + n_g, dtype=np.int64)
    gallery_index = np.asarray(gallery_index, np.int64)
    out = {m: (np.full((n_p, k), -1, np.int64), np.full((n_p, k), -np.inf, np.float32))
           for m in METHODS}  # fmt: skip
    starts = range(0, n_g, gallery_block)
    band = -(-gallery_block // BANDS)
    # per block, the lowest quality of each band: (blocks, bands), bands past the end = +inf
    band_min = np.full((len(starts), BANDS), np.inf)
    for b, g0 in enumerate(starts):
        qb = q_gallery[g0 : g0 + gallery_block]
        for j, c0 in enumerate(range(0, len(qb), band)):
            band_min[b, j] = qb[c0 : c0 + band].min()
    mask = np.empty((min(probe_block, n_p), gallery_block), dtype=bool)
    for p0 in range(0, n_p, probe_block):
        pb = probes[p0 : p0 + probe_block]
        qp = q_probe[p0 : p0 + probe_block]
        cos_list, qm_list = _Running(len(pb), k), _Running(len(pb), k)
        for b, g0 in enumerate(starts):
            gb = gallery[g0 : g0 + gallery_block]
            qg = q_gallery[g0 : g0 + gallery_block]
            index = gallery_index[g0 : g0 + gallery_block]
            cos = pb @ gb.T
            q_floor = (
                qmagface_floor(
                    qm_list.kth[:, None], np.minimum(qp[:, None], band_min[b][None, :]), alpha,
                    beta,
                )
                if qm_list.full
                else None
            )  # fmt: skip
            if q_floor is None:
                cos_list.merge_block(cos, index)
                qm_list.merge_block(qmagface_block(cos, qp, qg, alpha, beta), index)
                continue
            if cos_list.full:  # one pass over the block finds the candidates of both lists
                c_floor = cos_list.kth
                low = np.minimum(c_floor.astype(np.float64)[:, None], q_floor)
            else:
                cos_list.merge_block(cos, index)
                c_floor, low = None, q_floor
            low = low.astype(np.float32)
            m = mask[: len(pb), : len(gb)]
            for j, c0 in enumerate(range(0, len(gb), band)):
                np.greater(cos[:, c0 : c0 + band], low[:, j : j + 1], out=m[:, c0 : c0 + band])
            rows, cols = np.nonzero(m)
            vals = cos[rows, cols]
            if c_floor is not None:
                sel = vals > c_floor[rows]
                cos_list.merge_sparse(rows[sel], index[cols[sel]], vals[sel])
            sel = vals > q_floor[rows, cols // band]
            r, c = rows[sel], cols[sel]
            qm = qmagface_values(vals[sel], np.minimum(qp[r], qg[c]), alpha, beta)
            keep = qm > qm_list.kth[r]
            qm_list.merge_sparse(r[keep], index[c[keep]], qm[keep])
        for name, run in (("cosine", cos_list), ("qmagface", qm_list)):
            out[name][0][p0 : p0 + len(pb)] = run.index
            out[name][1][p0 : p0 + len(pb)] = run.score
    return {name: TopK(*out[name]) for name in METHODS}


def search(
    probes: np.ndarray,
    gallery: np.ndarray,
    k: int,
    alpha: float,
    beta: float,
    *,
    q_probes: np.ndarray | None = None,
    q_gallery: np.ndarray | None = None,
    probe_block: int = PROBE_BLOCK,
    gallery_block: int = GALLERY_BLOCK,
) -> dict[str, TopK]:
    """Exact top-``k`` lists of raw-embedding ``probes`` against a raw-embedding ``gallery``;
    qualities default to the embedding norms."""
    up, qp = unit_rows(probes)
    qp = qp if q_probes is None else np.asarray(q_probes, np.float32)
    qg = row_norms(gallery) if q_gallery is None else np.asarray(q_gallery, np.float32)
    order = quality_order(qg, gallery_block)
    ug, _ = unit_rows(gallery, order)
    return search_block_range(
        up, qp, ug, qg[order], 0, k, alpha, beta, gallery_index=order,
        probe_block=probe_block, gallery_block=gallery_block,
    )  # fmt: skip
