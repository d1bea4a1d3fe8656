"""The output of an embedding run: Parquet parts, failures, the run marker and ``summary.json``.

Layout under the output URI::

    embeddings/part-00000-<run>.parquet   path, identity, embedding (fixed-size float32), quality
    failures/part-00000-<run>.parquet     path, error
    _embed_run.json                       what the run embeds with (checked when resuming)
    summary.json                          written last: its presence means the run finished

Parts appear atomically (temporary names start with ``.``), and names starting with ``.`` or
``_`` are not data, so a reader never mistakes a half-written output for a complete one.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qmag_ray import storage
from qmag_ray.embedding.config import EmbedError

logger = logging.getLogger(__name__)

FAILURES_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string())])


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


def read_done_paths(layout: OutputLayout) -> set[str]:
    """Paths that already have an embedding in ``layout``'s parts."""
    done: set[str] = set()
    for uri in list_parts(layout.embeddings):
        fs, path = storage.filesystem(uri)
        try:
            with fs.open(path, "rb") as f:
                column = pq.read_table(f, columns=["path"]).column("path").to_pylist()
        except Exception as exc:
            raise EmbedError(
                f"cannot read existing part {storage.redact(uri)} ({exc}); "
                "pass --overwrite to start the output afresh"
            ) from None
        done.update(column)
    return done


def clear(layout: OutputLayout) -> None:
    """Remove everything an embedding run writes under ``layout`` (and nothing else)."""
    for uri in (layout.summary, layout.marker):
        fs, path = storage.filesystem(uri)
        if fs.exists(path):
            fs.rm(path)
    storage.remove_tree(layout.embeddings)
    storage.remove_tree(layout.failures)
    fs, path = storage.filesystem(layout.root)
    fs.invalidate_cache()


def prepare(
    layout: OutputLayout, fingerprint: dict[str, Any], input_paths: set[str], *, overwrite: bool
) -> set[str]:
    """Make ``layout`` ready for a run and return the input paths already embedded there.

    A finished output (``summary.json`` present) is refused unless ``overwrite``, which clears
    it. An interrupted one (marker but no summary) is resumed: its embeddings are kept, its
    failures are dropped so that those inputs are tried again. Resuming needs the same model,
    architecture and preprocessing, and no embeddings for paths outside the inputs.
    """
    where = storage.redact(layout.root)
    if storage.exists(layout.summary):
        if not overwrite:
            status = _summary_status(layout)
            raise EmbedError(
                f"{where} already holds a finished embedding run (summary.json, status "
                f"{status}); pass --overwrite to replace it, or choose another --output"
            )
        logger.info("overwriting the finished run in %s", where)
        clear(layout)
    elif overwrite:
        clear(layout)
    done: set[str] = set()
    if storage.exists(layout.marker):
        previous = json.loads(storage.read_bytes(layout.marker))
        changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {fingerprint[k]!r}" for k in changed)
            raise EmbedError(
                f"{where} holds an interrupted run with different settings ({details}); "
                "pass --overwrite to start again, or choose another --output"
            )
        done = read_done_paths(layout)
        stray = done - input_paths
        if stray:
            raise EmbedError(
                f"{where} holds embeddings for {len(stray)} paths that are not among the inputs "
                f"(e.g. {', '.join(sorted(stray)[:3])}); pass --overwrite or choose another "
                "--output"
            )
        storage.remove_tree(layout.failures)
        logger.info(
            "resuming the interrupted run in %s: %d inputs already embedded are skipped, "
            "earlier failures are retried",
            where,
            len(done),
        )
    elif list_parts(layout.embeddings) or list_parts(layout.failures):
        raise EmbedError(
            f"{where} holds embedding parts but no run marker, so it cannot be resumed safely; "
            "pass --overwrite or choose another --output"
        )
    storage.write_bytes(layout.marker, json.dumps(fingerprint, indent=2).encode())
    return done


def _summary_status(layout: OutputLayout) -> str:
    try:
        return str(json.loads(storage.read_bytes(layout.summary)).get("status", "unknown"))
    except (ValueError, OSError):
        return "unreadable"


class PartWriter:
    """Buffers record batches and writes them as atomic Parquet parts of bounded size."""

    def __init__(self, folder: str, run_id: str, schema: pa.Schema, rows_per_part: int) -> None:
        self.folder = folder
        self.run_id = run_id
        self.schema = schema
        self.rows_per_part = rows_per_part
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.parts = 0
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self._buffer.append(batch)
        self._buffered += batch.num_rows
        if self._buffered >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        uri = storage.join(self.folder, f"part-{self.parts:05d}-{self.run_id}.parquet")
        with storage.atomic_open(uri) as f:
            pq.write_table(table, f)
        self.parts += 1
        self.rows += table.num_rows
        self._buffer.clear()
        self._buffered = 0


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


def failure_batch(paths: np.ndarray, errors: np.ndarray) -> pa.RecordBatch:
    """Rows for the failures parts."""
    return pa.RecordBatch.from_arrays(
        [pa.array(paths.tolist(), type=pa.string()), pa.array(errors.tolist(), type=pa.string())],
        schema=FAILURES_SCHEMA,
    )


_COUNTS = (
    "inputs",
    "embedded",
    "failed",
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the counts grouped under ``counts``."""
        data = asdict(self)
        counts = {k: data.pop(k) for k in _COUNTS}
        head = {k: data.pop(k) for k in ("status", "output", "run_id")}
        return {**head, "counts": counts, **data}

    def line(self) -> str:
        """One-line human summary."""
        return (
            f"{self.status}: {self.embedded}/{self.inputs} embedded, {self.failed} failed, "
            f"{self.skipped_existing} already done, {self.images_per_second:.1f} images/s, "
            f"{self.wall_seconds:.1f} s -> {self.output}"
        )


def write_summary(layout: OutputLayout, summary: EmbedSummary) -> None:
    """Write ``summary.json``: the last file of a run, the sign that it finished."""
    text = json.dumps(summary.to_dict(), indent=2, sort_keys=False)
    storage.write_bytes(layout.summary, text.encode())
