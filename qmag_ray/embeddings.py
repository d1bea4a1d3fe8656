"""The embeddings table: one row per face image (path, identity, embedding, quality).

The embedding job writes ``OUTPUT/embeddings/`` as Parquet part files with the columns
``path`` (string), ``identity`` (string, nullable), ``embedding`` (fixed_size_list<float32>[D])
and ``quality`` (float32, the L2 norm of the raw MagFace embedding). This module reads that
layout from any fsspec URI into numpy arrays, checks it, and writes it (for tests and tools).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qmag_ray import storage

log = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
SHOW = 10  # how many offending items an error message lists


class EmbeddingsError(ValueError):
    """An embeddings table that cannot be used; the message says what and where."""


def _listing(items: list[str] | np.ndarray, total: int | None = None) -> str:
    """The first few items, quoted, with a count of the rest."""
    shown = [repr(str(x)) for x in list(items)[:SHOW]]
    total = len(items) if total is None else total
    more = f", ... ({total - len(shown)} more)" if total > len(shown) else ""
    return ", ".join(shown) + more


@dataclass(frozen=True, eq=False)
class EmbeddingTable:
    """Embeddings of N face images as numpy arrays (picklable, no open files).

    Attributes:
        path: (N,) object array of str, unique image paths.
        identity: (N,) object array of str, or None where the identity is unknown.
        vectors: (N, D) float32 raw (not normalised) embeddings.
        quality: (N,) float32 image qualities (the embeddings' L2 norms).
    """

    path: np.ndarray
    identity: np.ndarray
    vectors: np.ndarray
    quality: np.ndarray
    _fingerprint: list[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        path = np.asarray(self.path, dtype=object).reshape(-1)
        n = len(path)
        identity = (
            np.full(n, None, dtype=object)
            if self.identity is None
            else np.asarray(self.identity, dtype=object).reshape(-1)
        )
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise EmbeddingsError(f"vectors must be an (N, D) array, got shape {vectors.shape}")
        quality = np.ascontiguousarray(self.quality, dtype=np.float32).reshape(-1)
        if not (len(identity) == len(vectors) == len(quality) == n):
            raise EmbeddingsError(
                f"table columns differ in length: path {n}, identity {len(identity)}, "
                f"vectors {len(vectors)}, quality {len(quality)}"
            )
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "identity", identity)
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "quality", quality)
        object.__setattr__(self, "_fingerprint", [])

    def __len__(self) -> int:
        return len(self.path)

    @property
    def dim(self) -> int:
        """The embedding dimension D."""
        return int(self.vectors.shape[1])

    def has_identities(self) -> bool:
        """Whether every row has an identity label."""
        return not any(x is None for x in self.identity)

    def index_of(self, paths: list[str] | np.ndarray, missing: int | None = None) -> np.ndarray:
        """Row index of each of ``paths`` (int64).

        Args:
            paths: image paths, exactly as in the ``path`` column.
            missing: value for paths not in the table; None makes them an error.
        """
        lookup = {p: i for i, p in enumerate(self.path)}
        out = np.fromiter((lookup.get(p, -1) for p in paths), dtype=np.int64, count=len(paths))
        absent = np.flatnonzero(out < 0)
        if absent.size:
            if missing is None:
                names = [paths[int(i)] for i in absent]
                raise KeyError(
                    f"{absent.size} path(s) are not in the embeddings table: {_listing(names)}"
                )
            out[absent] = missing
        return out

    def fingerprint(self) -> str:
        """Short hex sha256 of the paths, the vectors and the qualities (cached)."""
        if not self._fingerprint:
            digest = hashlib.sha256()
            digest.update("\0".join(str(p) for p in self.path).encode("utf-8"))
            digest.update(np.int64(self.dim).tobytes())
            digest.update(self.vectors.tobytes())
            digest.update(self.quality.tobytes())
            self._fingerprint.append(digest.hexdigest()[:16])
        return self._fingerprint[0]

    def bad_rows(self) -> np.ndarray:
        """Indices of rows whose embedding has NaN/inf or is all zero, or whose quality is bad."""
        finite = np.isfinite(self.vectors).all(axis=1)
        nonzero = (self.vectors != 0).any(axis=1)
        good_q = np.isfinite(self.quality) & (self.quality >= 0)
        return np.flatnonzero(~(finite & nonzero & good_q))

    def take(self, indices: np.ndarray | list[int]) -> EmbeddingTable:
        """A new table of the given rows, in the given order."""
        idx = np.asarray(indices, dtype=np.int64)
        return EmbeddingTable(
            self.path[idx], self.identity[idx], self.vectors[idx], self.quality[idx]
        )

    def validate(self, policy: Literal["error", "skip"] = "error") -> tuple[EmbeddingTable, int]:
        """Check for NaN/inf/all-zero embeddings (and bad qualities).

        Returns:
            ``(table, n_skipped)``: with ``policy="skip"`` the table without the bad rows and
            how many were dropped (callers report it); with ``"error"`` ``(self, 0)``.

        Raises:
            EmbeddingsError: with ``policy="error"``, listing the bad paths.
        """
        if policy not in ("error", "skip"):
            raise ValueError(f"policy must be 'error' or 'skip', got {policy!r}")
        bad = self.bad_rows()
        if bad.size == 0:
            return self, 0
        if policy == "error":
            raise EmbeddingsError(
                f"{bad.size} of {len(self)} embeddings are unusable (NaN/inf, all zero or bad "
                f"quality): {_listing(self.path[bad])}; use policy='skip' to drop them"
            )
        log.warning(
            "skipping %d of %d unusable embeddings (NaN/inf, all zero or bad quality): %s",
            bad.size,
            len(self),
            _listing(self.path[bad]),
        )
        keep = np.setdiff1d(np.arange(len(self)), bad)
        return self.take(keep), int(bad.size)


def _check_duplicates(path: np.ndarray, where: str) -> None:
    uniq, counts = np.unique(path.astype(str), return_counts=True)
    dup = uniq[counts > 1]
    if dup.size:
        raise EmbeddingsError(
            f"{dup.size} path(s) occur more than once in {where}: {_listing(dup)}"
        )


def _embedding_matrix(column: pa.ChunkedArray, where: str) -> np.ndarray:
    """(n, D) float32 from a fixed-size or variable list column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise EmbeddingsError(f"{where}: {arr.null_count} row(s) have a null embedding")
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = np.asarray(arr.value_lengths())
        if len(lengths) and (lengths != lengths[0]).any():
            raise EmbeddingsError(
                f"{where}: embeddings differ in length ({int(lengths.min())}..{int(lengths.max())})"
            )
        dim = int(lengths[0]) if len(lengths) else 0
    else:
        raise EmbeddingsError(
            f"{where}: column 'embedding' must be a list of floats, got {arr.type}"
        )
    values = arr.flatten()
    if values.null_count:
        raise EmbeddingsError(f"{where}: embeddings contain {values.null_count} null value(s)")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(arr), dim)


def _read_part(fs, fs_path: str, where: str) -> tuple[np.ndarray, ...]:
    try:
        with fs.open(fs_path, "rb") as f:
            tab = pq.read_table(f)
    except Exception as exc:  # re-raised with the file named
        raise EmbeddingsError(f"cannot read Parquet file {where}: {exc}") from exc
    names = set(tab.column_names)
    for required in ("path", "embedding"):
        if required not in names:
            raise EmbeddingsError(f"{where} has no column {required!r} (columns: {sorted(names)})")
    path_col = tab.column("path")
    if path_col.null_count:
        raise EmbeddingsError(f"{where}: {path_col.null_count} row(s) have a null path")
    path = np.asarray(path_col.to_pylist(), dtype=object)
    if "identity" in names:
        identity = np.asarray(tab.column("identity").to_pylist(), dtype=object)
    else:
        identity = np.full(len(path), None, dtype=object)
    vectors = _embedding_matrix(tab.column("embedding"), where)
    if "quality" in names:
        qcol = tab.column("quality")
        if qcol.null_count:
            raise EmbeddingsError(f"{where}: {qcol.null_count} row(s) have a null quality")
        quality = qcol.to_numpy().astype(np.float32)
    else:  # the MagFace quality is the embedding's norm
        quality = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
    return path, identity, vectors, quality.astype(np.float32)


def _part_files(uri: str) -> tuple[object, list[str], str]:
    """The filesystem, the sorted part files and the directory URI actually read."""
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/") or root
    if fs.isfile(root):
        return fs, [root], uri
    if not fs.isdir(root):
        raise EmbeddingsError(f"embeddings not found: {storage.redact(uri)} does not exist")
    sub = posixpath.join(root, EMBEDDINGS_DIR)
    if fs.isdir(sub):  # an embed job's OUTPUT (whatever its own folder is called)
        root, uri = sub, storage.join(uri, EMBEDDINGS_DIR)
    files = []
    for p in sorted(fs.find(root)):
        rel = storage.relative(root, p)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if not p.endswith(".parquet"):
            continue  # summary.json, failures/ notes and other non-Parquet files
        files.append(p)
    if not files:
        raise EmbeddingsError(f"no Parquet part files under {storage.redact(uri)}")
    return fs, files, uri


def load_embeddings(uri: str) -> EmbeddingTable:
    """Read the ``embeddings/`` Parquet layout (local path or any fsspec URI).

    Args:
        uri: the ``embeddings/`` directory, the job's OUTPUT directory containing it, or a
            single Parquet file. Files and folders whose names start with '.' or '_' are ignored.

    Raises:
        EmbeddingsError: missing columns, unreadable files, differing dimensions, null values
            or duplicate paths (named in the message).
    """
    fs, files, dir_uri = _part_files(uri)
    parts = []
    dims: dict[int, str] = {}
    for p in files:
        where = storage.redact(storage.unstrip(uri, p))
        part = _read_part(fs, p, where)
        if len(part[0]):
            dims.setdefault(part[2].shape[1], where)
            parts.append(part)
    if len(dims) > 1:
        detail = ", ".join(f"D={d} in {w}" for d, w in dims.items())
        raise EmbeddingsError(f"embedding dimensions differ between part files: {detail}")
    if not parts:
        raise EmbeddingsError(f"the embeddings under {storage.redact(dir_uri)} have no rows")
    path = np.concatenate([p[0] for p in parts])
    _check_duplicates(path, storage.redact(dir_uri))
    table = EmbeddingTable(
        path=path,
        identity=np.concatenate([p[1] for p in parts]),
        vectors=np.concatenate([p[2] for p in parts]),
        quality=np.concatenate([p[3] for p in parts]),
    )
    log.info(
        "loaded %d embeddings (D=%d) from %d file(s) under %s",
        len(table),
        table.dim,
        len(files),
        storage.redact(dir_uri),
    )
    return table


def to_arrow(table: EmbeddingTable) -> pa.Table:
    """The table in the ``embeddings/`` schema."""
    flat = pa.array(table.vectors.reshape(-1), type=pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(flat, table.dim)
    identity = [None if x is None else str(x) for x in table.identity]
    return pa.table(
        {
            "path": pa.array([str(p) for p in table.path], type=pa.string()),
            "identity": pa.array(identity, type=pa.string()),
            "embedding": emb,
            "quality": pa.array(table.quality, type=pa.float32()),
        }
    )


def write_embeddings(
    table: EmbeddingTable, uri: str, rows_per_file: int | None = None
) -> list[str]:
    """Write ``table`` as ``part-NNNNN.parquet`` files into the directory ``uri``.

    Returns:
        The URIs of the files written.
    """
    arrow = to_arrow(table)
    step = rows_per_file or max(1, len(table))
    written = []
    for k, start in enumerate(range(0, max(1, len(table)), step)):
        target = storage.join(uri, f"part-{k:05d}.parquet")
        with storage.atomic_open(target) as f:
            pq.write_table(arrow.slice(start, step), f)
        written.append(target)
    return written
