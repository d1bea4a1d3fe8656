"""Calibration on a Ray cluster: the pipeline of ``fit`` with its steps as Ray tasks.

The pair source is put into the object store once; each histogram pass of ``orderstats``
(per-weight, per-candidate or for the fitted score) runs as one task per shard, and the driver
adds the shards' histograms as they arrive: memory does not grow with the pairs. The cheap
steps (threshold search on the found order statistics, line fit) run on the driver. Every
task calls the same numpy functions as the in-process path, so the result does not depend on
the number of shards or workers, and equals ``fit_qmagface`` on the same arrays.

Ray must already be connected (entry points call ``qmag_ray.runtime.connect_ray``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import ray

from qmag_ray.calibration.orderstats import (
    PassPlan,
    PassResult,
    empty_result,
    merge_into,
    scan_blocks,
    shard_stream,
)
from qmag_ray.pairs.source import PairSource

logger = logging.getLogger(__name__)


@ray.remote
def _scan_shard(source: PairSource, index: int, plan: PassPlan) -> PassResult:
    return scan_blocks(shard_stream(source, index), plan)


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
        logger.debug("calibration: %s %d/%d done", what, done, total)  # --verbose
        yield index, result


class RayExecutor:
    """Runs each pass as one Ray task per shard; sums their results on the driver as they
    arrive (histograms add, so the driver holds one pass's state plus one arriving result)."""

    name = "ray"

    def __init__(self, source: PairSource, *, task_options: dict[str, Any] | None = None) -> None:
        if not ray.is_initialized():
            raise RuntimeError(
                "RayExecutor needs a connected Ray cluster; call "
                "qmag_ray.runtime.connect_ray(address) first (or fit in this process)"
            )
        self.source = source
        self.source_ref = ray.put(source)
        self.options = dict(task_options or {})
        self.passes = 0

    def run_pass(self, plan: PassPlan) -> PassResult:
        self.passes += 1
        plan_ref = ray.put(plan)
        task = _scan_shard.options(**self.options)
        refs = [task.remote(self.source_ref, i, plan_ref) for i in range(self.source.num_shards())]
        total = empty_result(plan)
        for _, result in _as_completed(refs, f"pass {self.passes} shard"):
            merge_into(total, result)
        return total
