"""The inputs of an embedding run: reading and decoding them in tasks (and small listings).

Inputs are rows of ``path`` (relative to the images root, with ``/``) and ``identity``
(``None`` when unknown), from a folder tree ``<identity>/<file>`` or from a manifest; the
embedding job lists them in Ray tasks (:mod:`qmag_ray.embedding.listing`), while
:func:`list_tree` and :func:`read_manifest` list small sets in one process (training data).
:func:`read_and_decode` is the per-batch function the Ray Data read stage runs: it never raises
for a bad file; the file becomes a row with an error message instead.
"""

from __future__ import annotations

import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from qmag_ray import storage
from qmag_ray.embedding.config import EmbedInputError
from qmag_ray.embedding.listing import LINK_OUTSIDE, _inside, normalise_path
from qmag_ray.embedding.retry import READ_ATTEMPTS, is_transient, store_options, with_retries
from qmag_ray.images import IMAGE_EXTENSIONS, INPUT_SIZE, ImageError, decode

logger = logging.getLogger(__name__)

REMOTE_READ_THREADS = 16
"""Concurrent object reads per task on remote filesystems (latency, not CPU, bounds them)."""


@dataclass(frozen=True)
class Inputs:
    """The listed inputs of a run.

    Attributes:
        table: columns ``path`` (str) and ``identity`` (str or None), one row per input.
        root: URI the paths are relative to.
        ignored: files under the images folder that were not taken as inputs (hidden files,
            names without an image extension), relative paths.
    """

    table: pd.DataFrame
    root: str
    ignored: list[str] = field(default_factory=list)


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def list_tree(images: str) -> Inputs:
    """Every image file under ``images``; identity is the first folder below it."""
    fs, root = storage.filesystem(images)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        raise EmbedInputError(f"images folder not found: {storage.redact(images)}")
    paths, identities, ignored = [], [], []
    for fs_path in sorted(fs.find(root)):
        rel = storage.relative(root, fs_path)
        ext = posixpath.splitext(rel)[1].lower()
        if _hidden(rel) or ext not in IMAGE_EXTENSIONS:
            ignored.append(rel)
            continue
        paths.append(rel)
        identities.append(rel.split("/", 1)[0] if "/" in rel else None)
    if not paths:
        raise EmbedInputError(
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {storage.redact(images)}"
        )
    table = pd.DataFrame({"path": paths, "identity": pd.Series(identities, dtype=object)})
    return Inputs(table=table, root=storage.unstrip(images, root), ignored=ignored)


def read_manifest(uri: str) -> pd.DataFrame:
    """Read a CSV or Parquet manifest with ``path`` and optional ``identity`` columns."""
    where = storage.redact(uri)
    if not storage.exists(uri):
        raise EmbedInputError(f"manifest not found: {where}")
    fs, path = storage.filesystem(uri)
    lower = path.lower()
    with fs.open(path, "rb") as f:
        if lower.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            frame = pq.read_table(f).to_pandas()
        elif lower.endswith((".csv", ".csv.gz", ".txt")):
            compression = "gzip" if lower.endswith(".gz") else None
            frame = pd.read_csv(f, dtype=str, keep_default_na=False, compression=compression)
        else:
            raise EmbedInputError(f"manifest {where} must be a .csv or .parquet file")
    if "path" not in frame.columns:
        raise EmbedInputError(
            f"manifest {where} has no 'path' column (columns: {', '.join(map(str, frame.columns))})"
        )
    paths = [normalise_path(p, where, i) for i, p in enumerate(frame["path"].tolist())]
    if "identity" in frame.columns:
        identities = [
            None if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == "" else str(v)
            for v in frame["identity"].tolist()
        ]
    else:
        identities = [None] * len(paths)
    table = pd.DataFrame({"path": paths, "identity": pd.Series(identities, dtype=object)})
    dup = table["path"].duplicated(keep=False)
    if dup.any():
        examples = ", ".join(sorted(set(table.loc[dup, "path"]))[:5])
        raise EmbedInputError(
            f"manifest {where} lists {int(dup.sum())} rows with repeated paths (e.g. {examples}); "
            "each image must appear once"
        )
    if table.empty:
        raise EmbedInputError(f"manifest {where} has no rows")
    return table


def _read_error(exc: BaseException, uri: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {uri}"
    if isinstance(exc, IsADirectoryError):
        return f"is a folder, not an image file: {uri}"
    if isinstance(exc, PermissionError):
        return f"permission denied reading {uri}"
    return f"cannot read {uri}: {type(exc).__name__}: {exc}"


def _read_one(fs, path: str, what: str, monitor: Any, attempts: int) -> bytes | BaseException:  # noqa: ANN001
    try:
        return with_retries(
            lambda: bytes(fs.cat_file(path)), what=what, monitor=monitor, attempts=attempts
        )
    except Exception as exc:  # recorded per file, never raised: the run goes on
        return exc


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    root: str,
    resize: bool,
    monitor: Any = None,
    attempts: int = READ_ATTEMPTS,
) -> dict:
    """Read and decode one batch of inputs (a Ray Data ``map_batches`` function).

    Args:
        batch: ``shard``, ``pos``, ``path`` (relative), ``identity`` and ``listed_error``
            (a reason found while listing, e.g. a link leaving the root: such rows are not read).
        root: URI the paths are relative to.
        resize: resize faces that are not 112x112 instead of failing them.
        monitor: a :class:`~qmag_ray.embedding.retry.StoreMonitor` handle told of retries.
        attempts: attempts per file before a store error counts as a transient failure.

    Returns:
        The input columns plus ``index`` (= ``pos``), ``image`` (uint8 N x 112 x 112 x 3, BGR;
        zeros where it failed), ``error`` (empty string when the image is good), ``transient``
        (the store could not be reached: retried by the next run) and ``resized_from``.
    """
    local = storage.protocol(root) == "file"
    fs, root_path = storage.filesystem(root, **store_options(root))
    root_path = root_path.rstrip("/")
    real_root = os.path.realpath(root_path) if local else ""
    rels = [str(p) for p in batch["path"]]
    listed = [str(e) if e is not None else "" for e in batch.get("listed_error", [""] * len(rels))]
    n = len(rels)
    errors = np.full(n, "", dtype=object)
    transient = np.zeros(n, dtype=bool)
    todo = []
    for i, rel in enumerate(rels):
        full = f"{root_path}/{rel}"
        if listed[i]:
            errors[i] = listed[i]
        elif local and not _inside(os.path.realpath(full), real_root):
            errors[i] = LINK_OUTSIDE  # checked again at read time: never read
        else:
            todo.append(i)
    what = [storage.redact(storage.unstrip(root, f"{root_path}/{rels[i]}")) for i in todo]
    paths = [f"{root_path}/{rels[i]}" for i in todo]
    if local or len(paths) <= 1:
        blobs = [_read_one(fs, p, w, monitor, attempts) for p, w in zip(paths, what, strict=True)]
    else:
        with ThreadPoolExecutor(max_workers=min(REMOTE_READ_THREADS, len(paths))) as pool:
            blobs = list(
                pool.map(
                    lambda pw: _read_one(fs, pw[0], pw[1], monitor, attempts),
                    zip(paths, what, strict=True),
                )
            )
    images = np.zeros((n, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    resized = np.full(n, "", dtype=object)
    for i, w, blob in zip(todo, what, blobs, strict=True):
        if isinstance(blob, BaseException):
            transient[i] = is_transient(blob)
            errors[i] = _read_error(blob, w)
            if transient[i]:
                errors[i] = (
                    f"store unreachable after {attempts} attempts ({errors[i]}); "
                    "run the same command again to retry"
                )
            continue
        try:
            face = decode(blob, resize=resize)
        except ImageError as exc:
            errors[i] = str(exc)
            continue
        images[i] = face.image
        if face.resized_from is not None:
            resized[i] = f"{face.resized_from[0]}x{face.resized_from[1]}"
    pos = np.asarray(batch["pos"], dtype=np.int64)
    return {
        "index": pos,
        "shard": np.asarray(batch["shard"], dtype=np.int64),
        "pos": pos,
        "path": np.asarray(rels, dtype=object),
        "identity": np.asarray(batch["identity"], dtype=object),
        "image": images,
        "error": errors,
        "transient": transient,
        "resized_from": resized,
    }
