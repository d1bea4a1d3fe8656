"""The inputs of an embedding run: listing them on the driver, reading and decoding them in tasks.

Inputs are a table of ``path`` (relative to the images root, with ``/``) and ``identity``
(``None`` when unknown), from a folder tree ``<identity>/<file>`` or from a manifest.
:func:`read_and_decode` is the per-batch function the Ray Data read stage runs: it never raises
for a bad file; the file becomes a row with an error message instead.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from qmag_ray import storage
from qmag_ray.embedding.config import EmbedConfig, EmbedError
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


def list_inputs(config: EmbedConfig) -> Inputs:
    """List the run's inputs from ``config.images`` (a tree) or ``config.manifest``."""
    if config.images:
        return list_tree(config.images)
    assert config.manifest is not None
    root = config.images_root or storage.unstrip(
        config.manifest, posixpath.dirname(storage.filesystem(config.manifest)[1])
    )
    return Inputs(table=read_manifest(config.manifest), root=root)


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def list_tree(images: str) -> Inputs:
    """Every image file under ``images``; identity is the first folder below it."""
    fs, root = storage.filesystem(images)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        raise EmbedError(f"images folder not found: {storage.redact(images)}")
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
        raise EmbedError(
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {storage.redact(images)}"
        )
    table = pd.DataFrame({"path": paths, "identity": pd.Series(identities, dtype=object)})
    return Inputs(table=table, root=storage.unstrip(images, root), ignored=ignored)


def read_manifest(uri: str) -> pd.DataFrame:
    """Read a CSV or Parquet manifest with ``path`` and optional ``identity`` columns."""
    where = storage.redact(uri)
    if not storage.exists(uri):
        raise EmbedError(f"manifest not found: {where}")
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
            raise EmbedError(f"manifest {where} must be a .csv or .parquet file")
    if "path" not in frame.columns:
        raise EmbedError(
            f"manifest {where} has no 'path' column (columns: {', '.join(map(str, frame.columns))})"
        )
    paths = [_clean_path(p, where, i) for i, p in enumerate(frame["path"].tolist())]
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
        raise EmbedError(
            f"manifest {where} lists {int(dup.sum())} rows with repeated paths (e.g. {examples}); "
            "each image must appear once"
        )
    if table.empty:
        raise EmbedError(f"manifest {where} has no rows")
    return table


def _clean_path(value: object, where: str, row: int) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == "":
        raise EmbedError(f"manifest {where} row {row + 2}: empty path")
    text = str(value).replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    if text.startswith("/") or "://" in text or ".." in text.split("/"):
        raise EmbedError(
            f"manifest {where} row {row + 2}: path {text!r} must be relative to the images root "
            "(no leading '/', no scheme, no '..')"
        )
    return text


def _read_error(exc: BaseException, uri: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {uri}"
    if isinstance(exc, IsADirectoryError):
        return f"is a folder, not an image file: {uri}"
    if isinstance(exc, PermissionError):
        return f"permission denied reading {uri}"
    return f"cannot read {uri}: {type(exc).__name__}: {exc}"


def _read_one(fs, path: str) -> bytes | BaseException:  # noqa: ANN001 - any fsspec filesystem
    try:
        return bytes(fs.cat_file(path))
    except Exception as exc:  # recorded per file, never raised: the run goes on
        return exc


def read_and_decode(batch: dict[str, np.ndarray], *, root: str, resize: bool) -> dict:
    """Read and decode one batch of inputs (a Ray Data ``map_batches`` function).

    Args:
        batch: ``index`` (int64) and ``path`` (relative paths).
        root: URI the paths are relative to.
        resize: resize faces that are not 112x112 instead of failing them.

    Returns:
        ``index``, ``image`` (uint8 N x 112 x 112 x 3, BGR; zeros where it failed), ``error``
        (empty string when the image is good) and ``resized_from`` (``WxH`` or empty).
    """
    fs, root_path = storage.filesystem(root)
    root_path = root_path.rstrip("/")
    rels = [str(p) for p in batch["path"]]
    fs_paths = [f"{root_path}/{rel}" for rel in rels]
    if storage.protocol(root) == "file" or len(fs_paths) == 1:
        blobs = [_read_one(fs, p) for p in fs_paths]
    else:
        with ThreadPoolExecutor(max_workers=min(REMOTE_READ_THREADS, len(fs_paths))) as pool:
            blobs = list(pool.map(lambda p: _read_one(fs, p), fs_paths))
    n = len(rels)
    images = np.zeros((n, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    resized = np.full(n, "", dtype=object)
    for i, blob in enumerate(blobs):
        if isinstance(blob, BaseException):
            errors[i] = _read_error(blob, storage.redact(storage.unstrip(root, fs_paths[i])))
            continue
        try:
            face = decode(blob, resize=resize)
        except ImageError as exc:
            errors[i] = str(exc)
            continue
        images[i] = face.image
        if face.resized_from is not None:
            resized[i] = f"{face.resized_from[0]}x{face.resized_from[1]}"
    return {
        "index": np.asarray(batch["index"], dtype=np.int64),
        "path": np.asarray(rels, dtype=object),
        "image": images,
        "error": errors,
        "resized_from": resized,
    }
