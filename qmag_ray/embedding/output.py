"""The output of an embedding run: Parquet parts, failures, the run marker and ``summary.json``.

Layout under the output URI::

    embeddings/shard-00003/part-<start>-<end>-<run>.parquet   path, identity, embedding, quality
    failures/shard-00003/part-<start>-<end>-<run>.parquet     path, error, transient
    _embed_run.json      what the run embeds with and how inputs are sharded (kept for resuming)
    _inputs/             a CSV manifest converted to Parquet row groups (listing input)
    .lease.json          the running writer's lease (qmag_ray.lease)
    summary.json         written last: its presence means the run finished

Parts are written by the model actors (:mod:`qmag_ray.embedding.writer`) and appear
atomically (temporary names start with ``.``); names starting with ``.`` or ``_`` are not data,
so a reader never mistakes a half-written output for a complete one.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from qmag_ray import storage
from qmag_ray.embedding.config import EmbedInputError

logger = logging.getLogger(__name__)

FAILURES_SCHEMA = pa.schema(
    [("path", pa.string()), ("error", pa.string()), ("transient", pa.bool_())]
)

LAYOUT_VERSION = 2
"""Version of this layout in the run marker (1: parts directly under embeddings/)."""


def embeddings_schema(dim: int, extra: tuple[str, ...] = ()) -> pa.Schema:
    """Schema of the embedding parts for ``dim``-dimensional embeddings (plus float32 extra
    per-image quality columns such as ``serfiq``)."""
    return pa.schema(
        [
            ("path", pa.string()),
            ("identity", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("quality", pa.float32()),
            *((name, pa.float32()) for name in extra),
        ]
    )


@dataclass(frozen=True)
class OutputLayout:
    """The URIs of one output folder."""

    root: str

    @property
    def embeddings(self) -> str:
        return storage.join(self.root, "embeddings")

    @property
    def failures(self) -> str:
        return storage.join(self.root, "failures")

    @property
    def summary(self) -> str:
        return storage.join(self.root, "summary.json")

    @property
    def marker(self) -> str:
        return storage.join(self.root, "_embed_run.json")

    @property
    def inputs(self) -> str:
        return storage.join(self.root, "_inputs")


def shard_folder(folder: str, shard: int) -> str:
    """The folder of one listing shard's parts under ``embeddings/`` or ``failures/``."""
    return storage.join(folder, f"shard-{shard:05d}")


def is_data_file(name: str) -> bool:
    """A part file a reader should load (not a temporary or private file)."""
    base = posixpath.basename(name)
    return base.endswith(".parquet") and not base.startswith((".", "_"))


def list_parts(folder: str) -> list[str]:
    """URIs of the finished Parquet parts under ``folder`` (none if it does not exist)."""
    fs, path = storage.filesystem(folder)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return [storage.unstrip(folder, p) for p in sorted(fs.find(path)) if is_data_file(p)]


def clear(layout: OutputLayout) -> None:
    """Remove everything an embedding run writes under ``layout`` (and nothing else)."""
    for uri in (layout.summary, layout.marker):
        fs, path = storage.filesystem(uri)
        if fs.exists(path):
            fs.rm(path)
    storage.remove_tree(layout.embeddings)
    storage.remove_tree(layout.failures)
    storage.remove_tree(layout.inputs)
    fs, path = storage.filesystem(layout.root)
    fs.invalidate_cache()


@dataclass(frozen=True)
class OutputState:
    """What an output holds before a run: nothing, an unfinished run to resume, or a run to
    replace (``overwrite``)."""

    resume: bool
    shards: int | None
    reopen_summary: bool = False


def inspect(layout: OutputLayout, fingerprint: dict[str, Any], *, overwrite: bool) -> OutputState:
    """Decide what a run does with ``layout`` (reads only; the caller holds the lease).

    A complete output (``summary.json`` of a succeeded run without transient failures) is
    refused unless ``overwrite``. An output that failed or was interrupted is resumed: its
    parts are kept, its transient failures retried. Resuming needs the same model,
    architecture, preprocessing and images root as the marker recorded.
    """
    where = storage.redact(layout.root)
    has_summary = storage.exists(layout.summary)
    if overwrite:
        if has_summary:
            logger.info("overwriting the finished run in %s", where)
        return OutputState(resume=False, shards=None)
    if has_summary:
        status, transient = _summary_status(layout)
        if status == "succeeded" and not transient:
            raise EmbedInputError(
                f"{where} already holds a finished embedding run (summary.json, status "
                f"{status}); pass --overwrite to replace it, or choose another --output"
            )
    if storage.exists(layout.marker):
        previous = json.loads(storage.read_bytes(layout.marker))
        if previous.get("layout") != LAYOUT_VERSION:
            raise EmbedInputError(
                f"{where} holds a run written by an earlier qmag-ray (parts directly under "
                "embeddings/); pass --overwrite to start again, or choose another --output"
            )
        changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {fingerprint[k]!r}" for k in changed)
            raise EmbedInputError(
                f"{where} holds an unfinished run with different settings ({details}); "
                "pass --overwrite to start again, or choose another --output"
            )
        return OutputState(resume=True, shards=int(previous["shards"]), reopen_summary=has_summary)
    if _any_file(layout.embeddings) or _any_file(layout.failures) or has_summary:
        raise EmbedInputError(
            f"{where} holds embedding parts but no run marker, so it cannot be resumed safely; "
            "pass --overwrite or choose another --output"
        )
    return OutputState(resume=False, shards=None)


def start(
    layout: OutputLayout, state: OutputState, fingerprint: dict[str, Any], shards: int
) -> None:
    """Make ``layout`` ready: clear it (new or overwritten) or reopen it (summary removed), and
    write the run marker. The lease file is kept."""
    if not state.resume:
        clear(layout)
    elif state.reopen_summary:
        fs, path = storage.filesystem(layout.summary)
        fs.rm(path)
        logger.info("reopening %s: retrying its transient failures", storage.redact(layout.root))
    marker = {**fingerprint, "layout": LAYOUT_VERSION, "shards": shards}
    storage.write_bytes(layout.marker, json.dumps(marker, indent=2).encode())


def _any_file(folder: str) -> bool:
    fs, path = storage.filesystem(folder)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return False
    return any(is_data_file(p) for p in fs.find(path))


def _summary_status(layout: OutputLayout) -> tuple[str, int]:
    """The finished run's status and its number of transient failures."""
    try:
        data = json.loads(storage.read_bytes(layout.summary))
    except (ValueError, OSError):
        return "unreadable", 0
    transient = int(data.get("counts", {}).get("transient", 0) or 0)
    return str(data.get("status", "unknown")), transient


def embedding_batch(
    paths: np.ndarray,
    identities: np.ndarray,
    embeddings: np.ndarray,
    extra: dict[str, np.ndarray] | None = None,
) -> pa.RecordBatch:
    """Rows for the embeddings parts; quality is the float32 L2 norm of each embedding."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    quality = np.linalg.norm(emb, axis=1).astype(np.float32)
    dim = emb.shape[1]
    extra = extra or {}
    return pa.RecordBatch.from_arrays(
        [
            pa.array(paths.tolist(), type=pa.string()),
            pa.array(identities.tolist(), type=pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
            pa.array(quality, type=pa.float32()),
            *(pa.array(np.asarray(v, np.float32), type=pa.float32()) for v in extra.values()),
        ],
        schema=embeddings_schema(dim, tuple(extra)),
    )


def failure_batch(
    paths: np.ndarray, errors: np.ndarray, transient: np.ndarray | None = None
) -> pa.RecordBatch:
    """Rows for the failures parts (``transient``: the store was unreachable; retried by the
    next run of the same command)."""
    flags = np.zeros(len(paths), dtype=bool) if transient is None else np.asarray(transient, bool)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(paths.tolist(), type=pa.string()),
            pa.array(errors.tolist(), type=pa.string()),
            pa.array(flags, type=pa.bool_()),
        ],
        schema=FAILURES_SCHEMA,
    )


_COUNTS = (
    "inputs",
    "embedded",
    "failed",
    "transient",
    "skipped_existing",
    "embedded_this_run",
    "resized",
    "ignored_files",
)


@dataclass(frozen=True)
class EmbedSummary:
    """What a run did; written as ``summary.json`` and returned by ``run_embed``.

    ``images_per_second`` counts the images processed by this run (embedded or failed) over
    its wall time without the time taken to connect to (or start) Ray; ``timings`` breaks the
    wall time down (connecting, time to the first result, the pipeline).
    """

    status: str
    output: str
    run_id: str
    inputs: int
    embedded: int
    failed: int
    transient: int
    skipped_existing: int
    embedded_this_run: int
    resized: int
    ignored_files: int
    model_uri: str
    model_sha256: str
    arch: str
    embedding_size: int
    preprocessing: str
    images_per_second: float
    wall_seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    failure_examples: list[dict[str, str]] = field(default_factory=list)
    shards: int = 0
    nodes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the counts grouped under ``counts``."""
        data = asdict(self)
        counts = {k: data.pop(k) for k in _COUNTS}
        head = {k: data.pop(k) for k in ("status", "output", "run_id")}
        return {**head, "counts": counts, **data}

    def line(self) -> str:
        """One-line human summary."""
        transient = (
            f" ({self.transient} unreachable: run the same command again to retry them)"
            if self.transient
            else ""
        )
        return (
            f"{self.status}: {self.embedded}/{self.inputs} embedded, {self.failed} failed"
            f"{transient}, {self.skipped_existing} already done, "
            f"{self.images_per_second:.1f} images/s, {self.wall_seconds:.1f} s -> {self.output}"
        )


def write_summary(layout: OutputLayout, summary: EmbedSummary) -> None:
    """Write ``summary.json``: the last file of a run, the sign that it finished."""
    text = json.dumps(summary.to_dict(), indent=2, sort_keys=False)
    storage.write_bytes(layout.summary, text.encode())
