"""Calibration on a Ray cluster: the pipeline of ``fit`` with its steps as Ray tasks.

The pair source is put into the object store once; one task per shard streams that shard's
pair blocks into a ``TailSummary`` (per-weight impostor tails and the genuine pairs), the
driver merges summaries as they arrive, one task per candidate weight runs the threshold
search, and one task per shard collects the impostor tail of the fitted QMagFace score. The
``direct`` method's candidates run the same way: one task per shard builds per-candidate
impostor tails for a batch of candidates, the driver merges them, and tasks over groups of
candidates evaluate them. Every
task calls the same numpy functions as the in-process path, so the result does not depend on
the number of shards or workers, and equals ``fit_qmagface`` on the same arrays.

Ray must already be connected (entry points call ``qmag_ray.runtime.connect_ray``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from qmag_ray.calibration.direct import (
    MAX_TAIL_VALUES,
    DirectSearch,
    evaluate_candidates,
    summarize_candidates,
)
from qmag_ray.calibration.fit import run_calibration
from qmag_ray.calibration.result import CalibrationGrid, QMagFaceCalibration
from qmag_ray.calibration.search import search_weight
from qmag_ray.calibration.tails import (
    TailSummary,
    impostor_score_tail,
    merge_into,
    summarize_blocks,
    top_k,
)
from qmag_ray.pairs.source import PairSource

logger = logging.getLogger(__name__)

#: Candidates of the ``direct`` method evaluated per Ray task.
CANDIDATES_PER_TASK = 64


@ray.remote
def _summarize_shard(source: PairSource, index: int, weights: np.ndarray, k: int) -> TailSummary:
    return summarize_blocks(source.shard_blocks(index), weights, k)


@ray.remote
def _search_weight(
    weight: float,
    tail: np.ndarray,
    genuine_cosine: np.ndarray,
    genuine_quality: np.ndarray,
    n_impostor: int,
    fmrs: np.ndarray,
    raw: bool,
) -> tuple[np.ndarray, np.ndarray]:
    return search_weight(weight, tail, genuine_cosine, genuine_quality, n_impostor, fmrs, raw=raw)


@ray.remote
def _summarize_candidates(
    source: PairSource, index: int, candidates: np.ndarray, k: int
) -> TailSummary:
    return summarize_candidates(source.shard_blocks(index), candidates, k)


@ray.remote
def _evaluate_candidates(
    candidates: np.ndarray,
    tails: list[np.ndarray],
    genuine_cosine: np.ndarray,
    genuine_quality: np.ndarray,
    n_impostor: int,
    fmrs: np.ndarray,
) -> np.ndarray:
    return evaluate_candidates(candidates, tails, genuine_cosine, genuine_quality, n_impostor, fmrs)


@ray.remote
def _score_tail_shard(
    source: PairSource, index: int, alpha: float, beta: float, k: int
) -> tuple[np.ndarray, int]:
    return impostor_score_tail(source.shard_blocks(index), alpha, beta, k)


def _as_completed(refs: list[ray.ObjectRef], what: str) -> Iterator[tuple[int, Any]]:
    """Yield (task index, result) as tasks finish, logging progress (done / total).

    Takes ownership of ``refs`` (the list is emptied): each result's object is released from
    the object store as soon as the caller has moved on, so finished shard summaries do not
    pile up there.
    """
    position = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    refs.clear()
    total = len(pending)
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ref = ready[0]
        index = position.pop(ref)
        result = ray.get(ref)
        del ready, ref
        done += 1
        logger.info("calibration: %s %d/%d done", what, done, total)
        yield index, result


class RayExecutor:
    """Runs the shard and weight steps as Ray tasks; merges on the driver as results arrive."""

    name = "ray"

    def __init__(self, source: PairSource, *, task_options: dict[str, Any] | None = None) -> None:
        self.source = source
        self.source_ref = ray.put(source)
        self.options = dict(task_options or {})

    def summarize(self, weights: np.ndarray, k: int) -> TailSummary:
        task = _summarize_shard.options(**self.options)
        refs = [
            task.remote(self.source_ref, i, weights, k) for i in range(self.source.num_shards())
        ]
        merged = TailSummary.empty(weights, k)
        for _, summary in _as_completed(refs, "shard summary"):
            merge_into(merged, summary)
        return merged

    def search(
        self, summary: TailSummary, fmrs: np.ndarray, *, raw: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """One task per weight. Moves ``summary``'s tails into the object store (the rows in
        ``summary`` are emptied), so the driver does not hold them twice."""
        gen_c = ray.put(summary.genuine_cosine)
        gen_q = ray.put(summary.genuine_quality)
        task = _search_weight.options(**self.options)
        refs = []
        for i, w in enumerate(summary.weights):
            tail = ray.put(summary.tails[i])
            summary.tails[i] = np.empty(0)  # the object store holds it now; free the driver's
            refs.append(task.remote(float(w), tail, gen_c, gen_q, summary.n_impostor, fmrs, raw))
        results: list[Any] = [None] * len(summary.weights)
        for i, result in _as_completed(refs, "weight search"):
            results[i] = result
        return np.stack([t for t, _ in results]), np.stack([a for _, a in results])

    def score_tail(self, alpha: float, beta: float, k: int) -> tuple[np.ndarray, int]:
        task = _score_tail_shard.options(**self.options)
        refs = [
            task.remote(self.source_ref, i, alpha, beta, k) for i in range(self.source.num_shards())
        ]
        tail, n = np.empty(0), 0
        for _, (part, count) in _as_completed(refs, "QMagFace score tail"):
            tail, n = top_k(np.concatenate([tail, part]), k), n + count
        return tail, n

    def evaluate_candidates(self, candidates: np.ndarray, k: int, fmrs: np.ndarray) -> np.ndarray:
        """Per batch of candidates (as many as ``MAX_TAIL_VALUES`` tail values allow): one
        tail task per shard, a running merge here, then evaluation tasks of
        ``CANDIDATES_PER_TASK`` candidates each."""
        per_pass = max(1, MAX_TAIL_VALUES // max(k, 1))
        out = []
        for lo in range(0, len(candidates), per_pass):
            batch = np.ascontiguousarray(candidates[lo : lo + per_pass])
            task = _summarize_candidates.options(**self.options)
            refs = [
                task.remote(self.source_ref, i, batch, k) for i in range(self.source.num_shards())
            ]
            merged = TailSummary.empty(batch, k)
            for _, summary in _as_completed(refs, "candidate tails"):
                merge_into(merged, summary)
            gen_c = ray.put(merged.genuine_cosine)
            gen_q = ray.put(merged.genuine_quality)
            evaluate = _evaluate_candidates.options(**self.options)
            refs = []
            for a in range(0, len(batch), CANDIDATES_PER_TASK):
                b = min(len(batch), a + CANDIDATES_PER_TASK)
                tails = merged.tails[a:b]
                merged.tails[a:b] = [np.empty(0)] * (b - a)
                refs.append(
                    evaluate.remote(batch[a:b], tails, gen_c, gen_q, merged.n_impostor, fmrs)
                )
            results: list[Any] = [None] * len(refs)
            for i, result in _as_completed(refs, "candidate evaluation"):
                results[i] = result
            out.extend(results)
        return np.concatenate(out)


def fit_qmagface_ray(
    source: PairSource,
    grid: CalibrationGrid | None = None,
    *,
    method: str = "paper",
    direct: DirectSearch | None = None,
    task_options: dict[str, Any] | None = None,
) -> QMagFaceCalibration:
    """Fit alpha and beta on ``source`` with Ray tasks (one per shard, one per weight).

    Args:
        source: the calibration pairs, in shards.
        grid: the search grid (the paper's by default).
        method: ``"paper"`` (spec section 3, default), ``"raw"`` or ``"direct"``.
        direct: settings of the ``direct`` search (its defaults when None).
        task_options: extra ``.options(...)`` for every task, e.g. ``{"num_cpus": 1}``.

    Returns:
        The same ``QMagFaceCalibration`` that ``calibrate`` gives in one process.
    """
    if not ray.is_initialized():
        raise RuntimeError(
            "fit_qmagface_ray needs a connected Ray cluster; call "
            "qmag_ray.runtime.connect_ray(address) first (or use fit_qmagface without Ray)"
        )
    executor = RayExecutor(source, task_options=task_options)
    return run_calibration(
        executor, source, grid or CalibrationGrid(), method=method, direct=direct
    )
