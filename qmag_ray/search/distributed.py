"""The exact top-k search on Ray: the gallery cut into shards of whole blocks, one task each.

Each task runs ``topk.search_block_range`` on its shard against all probes and returns the
shard's top-k lists; the driver merges them (``topk.merge_topk``). Shards hold whole
``gallery_block``-row blocks, so the result is identical for any number of shards and equal to
the single-process search.

The driver normalises the gallery one shard at a time and puts each shard's unit rows (and
qualities) into the object store once; tasks read them there without copying (zero-copy numpy
views), and the probes are put once for all tasks. So the gallery exists once in the object
store, plus one shard's worth of temporary memory in the driver.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from qmag_ray.search.topk import (
    GALLERY_BLOCK,
    METHODS,
    PROBE_BLOCK,
    TopK,
    merge_topk,
    quality_order,
    row_norms,
    search_block_range,
    unit_rows,
)

logger = logging.getLogger(__name__)


def shard_bounds(n_gallery: int, shards: int, gallery_block: int = GALLERY_BLOCK) -> np.ndarray:
    """Row bounds of ``shards`` shards made of whole blocks (fewer when the gallery is small)."""
    blocks = max(1, -(-n_gallery // gallery_block))
    shards = max(1, min(shards, blocks))
    edges = np.round(np.linspace(0, blocks, shards + 1)).astype(np.int64) * gallery_block
    edges[-1] = n_gallery
    return np.unique(np.minimum(edges, n_gallery))


def _shard_task(
    probes: tuple[np.ndarray, np.ndarray],
    gallery: tuple[np.ndarray, np.ndarray, np.ndarray],
    offset: int,
    k: int,
    alpha: float,
    beta: float,
    probe_block: int,
    gallery_block: int,
) -> dict[str, TopK]:
    up, qp = probes
    ug, qg, index = gallery
    return search_block_range(
        up,
        qp,
        ug,
        qg,
        offset,
        k,
        alpha,
        beta,
        gallery_index=index,
        probe_block=probe_block,
        gallery_block=gallery_block,
    )


def search_sharded(
    probes: np.ndarray,
    gallery: np.ndarray,
    k: int,
    alpha: float,
    beta: float,
    *,
    shards: int,
    q_probes: np.ndarray | None = None,
    q_gallery: np.ndarray | None = None,
    use_ray: bool = True,
    probe_block: int = PROBE_BLOCK,
    gallery_block: int = GALLERY_BLOCK,
    progress_seconds: float = 10.0,
) -> dict[str, TopK]:
    """Exact top-``k`` by cosine and QMagFace of raw ``probes`` against a raw ``gallery``.

    ``q_probes`` and ``q_gallery`` are the qualities the QMagFace score uses (default: the
    embedding norms), one per row, non-negative. With ``use_ray`` one Ray task per shard (one
    CPU each); without, the shards run in turn in this process (same result).
    """
    up, qp = unit_rows(probes)
    if q_probes is not None:
        qp = _quality(q_probes, len(up), "probe")
    bounds = shard_bounds(len(gallery), shards, gallery_block)
    ranges = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    qg_all = None if q_gallery is None else _quality(q_gallery, len(gallery), "gallery")
    args = (k, alpha, beta, probe_block, gallery_block)

    def shard(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit rows, qualities and global indices of a shard, each block sorted by quality."""
        part = gallery[lo:hi]
        qg = row_norms(part) if qg_all is None else qg_all[lo:hi]
        order = quality_order(qg, gallery_block)
        ug, _ = unit_rows(part, order)
        return ug, qg[order], order + lo

    if not use_ray:
        parts = [_shard_task((up, qp), shard(lo, hi), lo, *args) for lo, hi in ranges]
    else:
        import ray

        task = ray.remote(num_cpus=1)(_shard_task)
        probe_ref = ray.put((up, qp))
        pending = {}
        for lo, hi in ranges:
            ref = task.remote(probe_ref, ray.put(shard(lo, hi)), lo, *args)
            pending[ref] = len(pending)
        parts_by = {}
        last = time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=progress_seconds)
            for ref in ready:
                parts_by[pending.pop(ref)] = ray.get(ref)
            if time.monotonic() - last >= progress_seconds or not pending:
                logger.info("search: %d of %d gallery shards done", len(parts_by), len(ranges))
                last = time.monotonic()
        parts = [parts_by[i] for i in range(len(ranges))]
    return {m: merge_topk([p[m] for p in parts], k) for m in METHODS}


def _quality(q: np.ndarray, n: int, what: str) -> np.ndarray:
    q = np.asarray(q, dtype=np.float32).reshape(-1)
    if len(q) != n:
        raise ValueError(f"{len(q)} {what} qualities for {n} {what} entries")
    if not np.isfinite(q).all() or (q < 0).any():
        raise ValueError(f"{what} qualities must be finite and >= 0")
    return q
