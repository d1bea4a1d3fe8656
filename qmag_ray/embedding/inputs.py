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
from qmag_ray.alignment import LANDMARK_COLUMNS
from qmag_ray.embedding.config import EmbedConfig, EmbedInputError
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


@dataclass(frozen=True, eq=False)
class LandmarkTable:
    """Five landmarks per image path (sorted paths, (n, 10) float64 points), for the decode
    tasks; an image it does not list gets NaN points, which fail as bad landmarks."""

    path: np.ndarray
    points: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> LandmarkTable:
        order = np.argsort(frame["path"].to_numpy(dtype=str), kind="stable")
        paths = frame["path"].to_numpy(dtype=str)[order]
        points = frame[list(LANDMARK_COLUMNS)].to_numpy(np.float64)[order]
        return cls(paths, points)

    def lookup(self, paths: list[str]) -> np.ndarray:
        """(len(paths), 10) points: by exact path, else by file name; NaN where not listed."""
        out = np.full((len(paths), 10), np.nan)
        for i, p in enumerate(paths):
            for key in (p, posixpath.basename(p)):
                k = int(np.searchsorted(self.path, key))
                if k < len(self.path) and self.path[k] == key:
                    out[i] = self.points[k]
                    break
        return out

    def __len__(self) -> int:
        return len(self.path)


def read_landmark_file(uri: str) -> pd.DataFrame:
    """IJB's ``*_name_5pts_score.txt``: ``name x1 y1 ... x5 y5 [score]`` per line.

    Returns a frame of ``path`` (the name) and the landmark columns; a name listed twice is an
    error.
    """
    import io

    where = storage.redact(uri)
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except FileNotFoundError:
        raise EmbedInputError(f"landmarks file not found: {where} (--landmarks)") from None
    try:
        frame = pd.read_csv(io.StringIO(text), sep=r"\s+", header=None, dtype=str)
    except pd.errors.EmptyDataError:
        raise EmbedInputError(f"landmarks file {where} is empty (--landmarks)") from None
    if frame.shape[1] not in (11, 12):
        raise EmbedInputError(
            f"landmarks file {where}: expected 'name x1 y1 ... x5 y5 [score]' (11 or 12 fields "
            f"per line), got {frame.shape[1]} (--landmarks)"
        )
    out = pd.DataFrame({"path": frame[0].astype(str).str.replace("\\", "/", regex=False)})
    for k, col in enumerate(LANDMARK_COLUMNS):
        values = pd.to_numeric(frame[k + 1], errors="coerce")
        if values.isna().any():
            line = int(np.flatnonzero(values.isna().to_numpy())[0]) + 1
            raise EmbedInputError(f"landmarks file {where}:{line}: {col} is not a number")
        out[col] = values.to_numpy(np.float64)
    dup = out["path"].duplicated()
    if dup.any():
        raise EmbedInputError(f"landmarks file {where} lists {out['path'][dup].iloc[0]!r} twice")
    return out


def manifest_landmarks(uri: str) -> pd.DataFrame | None:
    """The manifest's ``path`` and ``lm0_x ... lm4_y`` columns (None when it has none)."""
    where = storage.redact(uri)
    fs, path = storage.filesystem(uri)
    lower = path.lower()
    with fs.open(path, "rb") as f:
        if lower.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            names = pq.read_schema(f).names
            f.seek(0)
            wanted = [c for c in ("path", *LANDMARK_COLUMNS) if c in names]
            frame = pq.read_table(f, columns=wanted).to_pandas()
        else:
            compression = "gzip" if lower.endswith(".gz") else None
            frame = pd.read_csv(f, dtype=str, keep_default_na=False, compression=compression)
    present = [c for c in LANDMARK_COLUMNS if c in frame.columns]
    if not present:
        return None
    if len(present) < len(LANDMARK_COLUMNS):
        absent = [c for c in LANDMARK_COLUMNS if c not in frame.columns]
        raise EmbedInputError(
            f"manifest {where} has landmark columns but lacks {', '.join(absent)}"
        )
    out = pd.DataFrame(
        {"path": [normalise_path(p, where, i) for i, p in enumerate(frame["path"].tolist())]}
    )
    for col in LANDMARK_COLUMNS:  # empty cells are NaN: that image fails with a landmark error
        out[col] = pd.to_numeric(frame[col].replace("", np.nan), errors="coerce").to_numpy(
            np.float64
        )
    return out


def load_landmarks(config: EmbedConfig) -> LandmarkTable | None:
    """The run's landmarks (``--landmarks`` file, else the manifest's columns), or None."""
    if config.landmarks:
        return LandmarkTable.from_frame(read_landmark_file(config.landmarks))
    if config.manifest:
        frame = manifest_landmarks(config.manifest)
        return None if frame is None else LandmarkTable.from_frame(frame)
    return None


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
    landmarks: LandmarkTable | None = None,
    attempts: int = READ_ATTEMPTS,
) -> dict:
    """Read and decode one batch of inputs (a Ray Data ``map_batches`` function).

    Args:
        batch: ``shard``, ``pos``, ``path`` (relative), ``identity`` and ``listed_error``
            (a reason found while listing, e.g. a link leaving the root: such rows are not read).
        root: URI the paths are relative to.
        resize: resize faces that are not 112x112 instead of failing them.
        monitor: a :class:`~qmag_ray.embedding.retry.StoreMonitor` handle told of retries.
        landmarks: five landmarks per path: each image, of any size, is aligned onto the
            ArcFace template (an image without usable landmarks is a per-image failure).
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
    points = None if landmarks is None else landmarks.lookup(rels)
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
            face = decode(blob, resize=resize, landmarks=None if points is None else points[i])
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
        # a column of only nulls (files directly under the root) reaches numpy as NaN floats
        "identity": np.array(
            [x if isinstance(x, str) else None for x in batch["identity"]], dtype=object
        ),
        "image": images,
        "error": errors,
        "transient": transient,
        "resized_from": resized,
    }
