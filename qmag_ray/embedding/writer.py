"""Workers write their own results: the model actor's batches become Parquet parts where they
are produced, and only counts and part names travel back to the driver.

:class:`PartWritingActor` is the Ray Data actor of the pipeline. It holds an
:class:`~qmag_ray.embedding.actor.EmbedActor` (the network; its ``__call__(batch) -> batch`` is
unchanged) and writes, for each shard present in the batch, one embeddings part and one
failures part named after the input range it covers::

    embeddings/shard-00003/part-000000128-000000192-<run>.parquet

The name depends only on the shard, the first and last input position of the rows and the
run, so a block that Ray retries (a lost actor or node) rewrites the same part instead of
adding a second one. Each part's Parquet metadata records the model's sha256, the
architecture, the shard, the range, the run and the Ray node that wrote it (and the writer's
lease generation: a run whose lease was taken over is fenced off before each batch's parts).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qmag_ray import storage
from qmag_ray.embedding.actor import EmbedActor
from qmag_ray.embedding.output import (
    FAILURES_SCHEMA,
    OutputLayout,
    embedding_batch,
    embeddings_schema,
    failure_batch,
    shard_folder,
)
from qmag_ray.embedding.retry import with_retries

logger = logging.getLogger(__name__)

META_PREFIX = "qmag_ray."
NOT_FINITE = "embedding is not finite (NaN or inf): check the checkpoint"
EXAMPLES_PER_PART = 3


@dataclass(frozen=True)
class PartSpec:
    """Where and how the actors write parts (picklable; shipped to every actor)."""

    output: str
    run_id: str
    model_sha256: str
    arch: str
    dim: int
    extra: tuple[str, ...] = ()
    fence: Any = None  # lease.Fence of the run: checked before every batch's parts are written


def part_name(start: int, end: int, run_id: str) -> str:
    """The part file name of the input positions ``[start, end)`` of a shard in one run."""
    return f"part-{start:09d}-{end:09d}-{run_id}.parquet"


def part_metadata(spec: PartSpec, shard: int, start: int, end: int, node_id: str) -> dict:
    return {
        f"{META_PREFIX}model_sha256": spec.model_sha256,
        f"{META_PREFIX}arch": spec.arch,
        f"{META_PREFIX}shard": str(shard),
        f"{META_PREFIX}range": f"{start}-{end}",
        f"{META_PREFIX}run_id": spec.run_id,
        f"{META_PREFIX}node_id": node_id,
        **(
            {f"{META_PREFIX}lease_generation": str(spec.fence.generation)}
            if spec.fence is not None
            else {}
        ),
    }


def write_part(uri: str, table: pa.Table, metadata: dict[str, str], monitor: Any = None) -> None:
    """Write ``table`` atomically at ``uri`` with ``metadata``; transient errors are retried."""
    table = table.replace_schema_metadata(metadata)

    def put() -> None:
        with storage.atomic_open(uri) as f:
            pq.write_table(table, f)

    with_retries(put, what=f"writing {storage.redact(uri)}", monitor=monitor)


def write_parts(
    batch: dict[str, np.ndarray],
    embeddings: np.ndarray,
    errors: np.ndarray,
    spec: PartSpec,
    node_id: str,
    monitor: Any = None,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write the parts of one embedded batch; return one row of counts per shard in it."""
    layout = OutputLayout(spec.output)
    shard = np.asarray(batch["shard"], dtype=np.int64)
    pos = np.asarray(batch["pos"], dtype=np.int64)
    paths = np.asarray(batch["path"], dtype=object)
    # a block whose identities are all null (files directly under the root, as IJB's
    # loose_crop/) reaches numpy as NaN floats: they are unknown identities
    identities = np.array(
        [x if isinstance(x, str) else None for x in batch["identity"]], dtype=object
    )
    transient = np.asarray(batch["transient"], dtype=bool)
    resized = np.asarray(batch["resized_from"], dtype=object) != ""
    errors = np.asarray(errors, dtype=object).copy()
    emb = np.asarray(embeddings, dtype=np.float32)
    ok = errors == ""
    finite = np.isfinite(emb).all(axis=1)
    errors[ok & ~finite] = NOT_FINITE
    ok &= finite
    rows: dict[str, list] = {
        k: []
        for k in (
            "shard",
            "start",
            "end",
            "part",
            "embedded",
            "failed",
            "transient",
            "resized",
            "examples",
        )
    }
    if spec.fence is not None:  # a run that was taken over writes no more parts
        with_retries(spec.fence.check, what="checking the output lease", monitor=monitor)
    for j in np.unique(shard):
        sel = np.flatnonzero(shard == j)
        sel = sel[np.argsort(pos[sel], kind="stable")]
        start, end = int(pos[sel[0]]), int(pos[sel[-1]]) + 1
        name = part_name(start, end, spec.run_id)
        meta = part_metadata(spec, int(j), start, end, node_id)
        good, bad = sel[ok[sel]], sel[~ok[sel]]
        if len(good):
            table = pa.Table.from_batches(
                [
                    embedding_batch(
                        paths[good],
                        identities[good],
                        emb[good],
                        {k: np.asarray(v)[good] for k, v in (extra or {}).items()},
                    )
                ],
                schema=embeddings_schema(spec.dim, tuple(extra or {})),
            )
            write_part(
                storage.join(shard_folder(layout.embeddings, int(j)), name), table, meta, monitor
            )
        if len(bad):
            table = pa.Table.from_batches(
                [failure_batch(paths[bad], errors[bad], transient[bad])], schema=FAILURES_SCHEMA
            )
            write_part(
                storage.join(shard_folder(layout.failures, int(j)), name), table, meta, monitor
            )
        examples = [
            {"path": str(paths[i]), "error": str(errors[i])} for i in bad[:EXAMPLES_PER_PART]
        ]
        rows["shard"].append(int(j))
        rows["start"].append(start)
        rows["end"].append(end)
        rows["part"].append(name)
        rows["embedded"].append(len(good))
        rows["failed"].append(len(bad))
        rows["transient"].append(int(transient[bad].sum()))
        rows["resized"].append(int(resized[sel].sum()))
        rows["examples"].append(json.dumps(examples))
    return {
        "shard": np.asarray(rows["shard"], dtype=np.int64),
        "start": np.asarray(rows["start"], dtype=np.int64),
        "end": np.asarray(rows["end"], dtype=np.int64),
        "part": np.asarray(rows["part"], dtype=object),
        "embedded": np.asarray(rows["embedded"], dtype=np.int64),
        "failed": np.asarray(rows["failed"], dtype=np.int64),
        "transient": np.asarray(rows["transient"], dtype=np.int64),
        "resized": np.asarray(rows["resized"], dtype=np.int64),
        "examples": np.asarray(rows["examples"], dtype=object),
    }


class PartWritingActor:
    """Ray Data actor: embeds a batch with :class:`EmbedActor`, writes its parts, returns counts.

    Args:
        model, arch: the checkpoint and its backbone (for :class:`EmbedActor`).
        spec: where the parts go and what their metadata says.
        monitor: a ``StoreMonitor`` actor handle told of store retries (optional).
        embed_kwargs: the remaining :class:`EmbedActor` keyword arguments.
    """

    def __init__(
        self, model: str, arch: str, *, spec: PartSpec, monitor: Any = None, **embed_kwargs: Any
    ) -> None:
        self.embed = EmbedActor(model, arch, **embed_kwargs)
        self.spec = spec
        self.monitor = monitor
        try:
            import ray

            self.node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - outside Ray (unit use): no node
            self.node_id = ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.embed(batch)
        extra = {k: out[k] for k in self.spec.extra}
        return write_parts(
            batch, out["embedding"], out["error"], self.spec, self.node_id, self.monitor, extra
        )
