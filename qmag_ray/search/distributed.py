"""The exact top-k search on Ray: the gallery cut into shards of whole blocks, one task each.

Each task runs ``topk.search_block_range`` on its shard against all probes and returns the
shard's top-k lists; the driver merges them (``topk.merge_topk``). Shards hold whole
``gallery_block``-row blocks, so the result is identical for any number of shards and equal to
the single-process search.
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
    gallery: np.ndarray,
    q_gallery: np.ndarray,
    offset: int,
    k: int,
    alpha: float,
    beta: float,
    probe_block: int,
    gallery_block: int,
) -> dict[str, TopK]:
    up, qp = probes
    return search_block_range(
        up,
        qp,
        gallery,
        q_gallery,
        offset,
        k,
        alpha,
        beta,
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
    use_ray: bool = True,
    probe_block: int = PROBE_BLOCK,
    gallery_block: int = GALLERY_BLOCK,
    progress_seconds: float = 10.0,
) -> dict[str, TopK]:
    """Exact top-``k`` by cosine and QMagFace of raw ``probes`` against a raw ``gallery``.

    With ``use_ray`` one Ray task per shard (one CPU each); without, the shards run in turn
    in this process (same result).
    """
    up, qp = unit_rows(probes)
    ug, qg = unit_rows(gallery)
    bounds = shard_bounds(len(ug), shards, gallery_block)
    ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
    args = (k, alpha, beta, probe_block, gallery_block)
    if not use_ray:
        parts = [_shard_task((up, qp), ug[lo:hi], qg[lo:hi], int(lo), *args) for lo, hi in ranges]
    else:
        import ray

        task = ray.remote(num_cpus=1)(_shard_task)
        probe_ref = ray.put((up, qp))
        pending = {}
        for lo, hi in ranges:
            ref = task.remote(probe_ref, ray.put(ug[lo:hi]), ray.put(qg[lo:hi]), int(lo), *args)
            pending[ref] = len(pending)
        del ug, qg
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
