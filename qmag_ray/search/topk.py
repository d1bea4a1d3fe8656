"""Exact top-k search of probes against a gallery, by cosine and by the QMagFace score (numpy).

Scores are computed in blocks of ``probe_block x gallery_block`` (float32 matrix products of
unit vectors), so memory stays bounded whatever the gallery size. The QMagFace score of a probe
``p`` and a gallery entry ``g`` is ``s + min(0, beta * s - alpha) * min(q_p, q_g)``: its order
differs from cosine's because the quality term differs per candidate, so both rankings are
searched exactly, not re-ranked from cosine's list.

Ties are broken by the lower gallery index, and block boundaries are fixed multiples of
``gallery_block`` counted from the start of the whole gallery, so the lists are identical
however the gallery is cut into shards (shards hold whole blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROBE_BLOCK = 256
GALLERY_BLOCK = 32_768
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


def unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 unit rows, float32 norms) of raw embeddings; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x.astype(np.float64), axis=1)
    safe = np.where(norm > 0, norm, 1.0)
    return (x / safe[:, None].astype(np.float32)).astype(np.float32), norm.astype(np.float32)


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
    probe_block: int = PROBE_BLOCK,
    gallery_block: int = GALLERY_BLOCK,
) -> dict[str, TopK]:
    """Top ``k`` of every probe within gallery rows ``offset .. offset + len(gallery)``.

    ``probes`` and ``gallery`` are float32 unit rows; ``offset`` must be a multiple of
    ``gallery_block`` (so blocks line up with the whole gallery's).
    """
    if offset % gallery_block:
        raise ValueError(f"offset {offset} is not a multiple of the gallery block {gallery_block}")
    n_p, n_g = len(probes), len(gallery)
    results: dict[str, list[TopK]] = {m: [] for m in METHODS}
    for p0 in range(0, n_p, probe_block):
        pb = probes[p0 : p0 + probe_block]
        qp = q_probe[p0 : p0 + probe_block]
        per_block: dict[str, list[TopK]] = {m: [] for m in METHODS}
        for g0 in range(0, n_g, gallery_block):
            gb = gallery[g0 : g0 + gallery_block]
            cos = pb @ gb.T
            cols = np.arange(offset + g0, offset + g0 + len(gb), dtype=np.int64)
            per_block["cosine"].append(select_topk(cos, cols, k))
            qm = qmagface_block(cos, qp, q_gallery[g0 : g0 + gallery_block], alpha, beta)
            per_block["qmagface"].append(select_topk(qm, cols, k))
        for m in METHODS:
            results[m].append(merge_topk(per_block[m], k) if per_block[m] else _empty(len(pb), k))
    return {
        m: TopK(
            np.concatenate([t.index for t in results[m]])
            if results[m]
            else np.empty((0, k), np.int64),
            np.concatenate([t.score for t in results[m]])
            if results[m]
            else np.empty((0, k), np.float32),
        )
        for m in METHODS
    }


def _empty(p: int, k: int) -> TopK:
    return TopK(np.full((p, k), -1, np.int64), np.full((p, k), -np.inf, np.float32))


def search(
    probes: np.ndarray,
    gallery: np.ndarray,
    k: int,
    alpha: float,
    beta: float,
    *,
    probe_block: int = PROBE_BLOCK,
    gallery_block: int = GALLERY_BLOCK,
) -> dict[str, TopK]:
    """Exact top-``k`` lists of raw-embedding ``probes`` against a raw-embedding ``gallery``."""
    up, qp = unit_rows(probes)
    ug, qg = unit_rows(gallery)
    return search_block_range(
        up, qp, ug, qg, 0, k, alpha, beta, probe_block=probe_block, gallery_block=gallery_block
    )
