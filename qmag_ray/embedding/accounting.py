"""Exactly-once accounting per shard, in Ray tasks: what is left to do, and what was done.

Both functions take one shard's listing (its inputs, sorted by path) and read only that
shard's parts, so no process ever holds more than one shard:

- :func:`plan_shard` (before the pipeline): the inputs minus those the parts already hold
  (resume), after dropping the transient failures of earlier runs so they are tried again;
- :func:`check_shard` (after it): every input exactly once in ``embeddings/`` or
  ``failures/``, nothing else there, every part from this model; the counts for the summary.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qmag_ray import storage
from qmag_ray.embedding.output import OutputLayout, is_data_file, shard_folder
from qmag_ray.embedding.retry import with_retries

logger = logging.getLogger(__name__)

EXAMPLES = 3


def _part_uris(folder: str) -> list[str]:
    fs, path = storage.filesystem(folder)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return [storage.unstrip(folder, p) for p in sorted(fs.find(path)) if is_data_file(p)]


def read_part(uri: str, columns: list[str]) -> tuple[pa.Table, dict[str, str]]:
    """Columns of one part and its key-value metadata (str -> str)."""

    def read() -> tuple[pa.Table, dict[str, str]]:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            raw = pf.metadata.metadata or {}
            present = [c for c in columns if c in pf.schema_arrow.names]
            table = pf.read(columns=present)
        meta = {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW:")}
        return table, meta

    return with_retries(read, what=f"reading {storage.redact(uri)}")


def _paths(table: pa.Table) -> np.ndarray:
    return table.column("path").to_numpy(zero_copy_only=False).astype(object)


def plan_shard(listing: pa.Table, output: str, shard: int) -> tuple[pa.Table, dict[str, Any]]:
    """The shard's inputs still to embed, and what its parts already hold.

    Transient failures (an unreachable store) are removed from their failures parts first
    (each part rewritten atomically under its own name), so they become inputs again;
    permanent failures stay. Paths held by parts but not among the inputs are reported.
    """
    layout = OutputLayout(output)
    done: list[np.ndarray] = []
    embedded = failed = retried = 0
    for uri in _part_uris(shard_folder(layout.embeddings, shard)):
        paths = _paths(read_part(uri, ["path"])[0])
        embedded += len(paths)
        done.append(paths)
    for uri in _part_uris(shard_folder(layout.failures, shard)):
        table, meta = read_part(uri, ["path", "error", "transient"])
        if "transient" in table.column_names and table.num_rows:
            flags = table.column("transient").to_numpy(zero_copy_only=False).astype(bool)
            if flags.any():
                retried += int(flags.sum())
                kept = table.filter(pc.invert(table.column("transient")))
                _rewrite(uri, kept, meta)
                table = kept
        paths = _paths(table)
        failed += len(paths)
        done.append(paths)
    held = np.concatenate(done) if done else np.empty(0, dtype=object)
    inputs = _paths(listing).astype(str)
    held = held.astype(str)
    is_done = np.isin(inputs, held) if len(held) else np.zeros(len(inputs), dtype=bool)
    stray = np.setdiff1d(held, inputs) if len(held) else np.empty(0, dtype=str)
    uniq, counts = np.unique(held, return_counts=True) if len(held) else ([], [])
    repeated = [str(p) for p, c in zip(uniq, counts, strict=True) if c > 1]
    todo_idx = np.flatnonzero(~is_done)
    todo = listing.take(pa.array(todo_idx, pa.int64()))
    todo = todo.append_column("shard", pa.array(np.full(len(todo_idx), shard), pa.int64()))
    todo = todo.append_column("pos", pa.array(todo_idx, pa.int64()))
    meta = {
        "shard": shard,
        "inputs": len(inputs),
        "done_embedded": embedded,
        "done_failed": failed,
        "retried_transient": retried,
        "todo": len(todo_idx),
        "stray": len(stray),
        "stray_examples": [str(p) for p in stray[:EXAMPLES]],
        "repeated": len(repeated),
        "repeated_examples": repeated[:EXAMPLES],
    }
    return todo, meta


def _rewrite(uri: str, table: pa.Table, meta: dict[str, str]) -> None:
    fs, path = storage.filesystem(uri)
    if table.num_rows == 0:
        with_retries(lambda: fs.rm(path), what=f"removing {storage.redact(uri)}")
        return
    table = table.replace_schema_metadata(meta)

    def put() -> None:
        with storage.atomic_open(uri) as f:
            pq.write_table(table, f)

    with_retries(put, what=f"rewriting {storage.redact(uri)}")


def check_shard(listing: pa.Table, output: str, shard: int, model_sha256: str) -> dict[str, Any]:
    """Every input of the shard exactly once in its parts, nothing else, one model; counts."""
    layout = OutputLayout(output)
    inputs = _paths(listing).astype(str)
    held: list[np.ndarray] = []
    embedded = failed = transient = 0
    other_model: list[str] = []
    nodes: set[str] = set()
    for folder, columns in (
        (layout.embeddings, ["path"]),
        (layout.failures, ["path", "transient"]),
    ):
        for uri in _part_uris(shard_folder(folder, shard)):
            table, meta = read_part(uri, columns)
            if meta.get("qmag_ray.model_sha256") != model_sha256:
                other_model.append(storage.redact(uri))
            if meta.get("qmag_ray.node_id"):
                nodes.add(meta["qmag_ray.node_id"])
            paths = _paths(table).astype(str)
            held.append(paths)
            if folder == layout.embeddings:
                embedded += len(paths)
            else:
                failed += len(paths)
                if "transient" in table.column_names:
                    transient += int(table.column("transient").to_numpy(zero_copy_only=False).sum())
    all_held = np.concatenate(held) if held else np.empty(0, dtype=str)
    uniq, counts = np.unique(all_held, return_counts=True)
    repeated = uniq[counts > 1]
    missing = np.setdiff1d(inputs, uniq)
    stray = np.setdiff1d(uniq, inputs)
    return {
        "shard": shard,
        "inputs": len(inputs),
        "embedded": embedded,
        "failed": failed,
        "transient": transient,
        "repeated": len(repeated),
        "repeated_examples": [str(p) for p in repeated[:EXAMPLES]],
        "missing": len(missing),
        "missing_examples": [str(p) for p in missing[:EXAMPLES]],
        "stray": len(stray),
        "stray_examples": [str(p) for p in stray[:EXAMPLES]],
        "other_model_parts": other_model[:EXAMPLES],
        "nodes": sorted(nodes),
    }
