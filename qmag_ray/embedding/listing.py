"""Listing the inputs of an embedding run in Ray tasks, shard by shard.

The driver never holds the input paths. It lists only the top level of an images tree (or
reads a manifest's Parquet footer) and hands the rest to tasks:

- tree: shard ``j`` of ``K`` holds the top-level entries whose name hashes to ``j``; one task
  per shard walks its folders (symbolic links that leave the images root become failure rows,
  never read);
- manifest: one task per Parquet row group reads and normalises its rows and splits them by
  the hash of the path into ``K`` buckets; shard task ``j`` takes bucket ``j`` of every row
  group, so a repeated path always meets its twin in one task (the duplicate check).

A shard's listing is an Arrow table (``path``, ``identity``, ``listed_error``) sorted by
path, held in the object store; row ``i`` of it is the shard's input at position ``i``. ``K``
is chosen once per output and kept in its run marker, so a resumed or extended run shards the
same paths the same way.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from qmag_ray import storage
from qmag_ray.embedding.config import EmbedError
from qmag_ray.embedding.retry import with_retries
from qmag_ray.images import IMAGE_EXTENSIONS

TOP_LEVEL_PER_SHARD = 16
"""Top-level entries (identities) of a tree per listing shard, when an output is new."""

MANIFEST_ROWS_PER_SHARD = 50_000
"""Manifest rows per shard, when an output is new."""

MAX_SHARDS = 4096

LISTING_SCHEMA = pa.schema(
    [("path", pa.string()), ("identity", pa.string()), ("listed_error", pa.string())]
)

LINK_OUTSIDE = "symbolic link pointing outside the images root: not read"


def shard_of(key: str, shards: int) -> int:
    """The shard (of ``shards``) of a top-level name or manifest path; stable across runs."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


def shard_count(units: int, per_shard: int) -> int:
    """How many shards a new output gets for ``units`` top-level entries or manifest rows."""
    return int(min(MAX_SHARDS, max(1, -(-units // per_shard))))


def hidden(rel: str) -> bool:
    """Names starting with ``.`` or ``_`` are not inputs (temporary and private files)."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def normalise_path(value: object, where: str, row: int) -> str:
    """A manifest path relative to the images root in one canonical spelling.

    ``a/f.jpg``, ``a//f.jpg``, ``a/./f.jpg`` and ``a\\f.jpg`` are one file; absolute paths,
    schemes and ``..`` are refused (they could leave the root).
    """
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == "":
        raise EmbedError(f"manifest {where} row {row + 2}: empty path")
    text = str(value).replace("\\", "/")
    parts = text.split("/")
    if text.startswith("/") or "://" in text or ".." in parts:
        raise EmbedError(
            f"manifest {where} row {row + 2}: path {text!r} must be relative to the images root "
            "(no leading '/', no scheme, no '..')"
        )
    clean = [p for p in parts if p not in ("", ".")]
    if not clean:
        raise EmbedError(f"manifest {where} row {row + 2}: path {text!r} names no file")
    return "/".join(clean)


# ----------------------------------------------------------------------------- trees


@dataclass(frozen=True)
class TopLevel:
    """The first level of an images tree: its entries' names (files and folders)."""

    root: str
    names: list[str]


def list_top_level(images: str) -> TopLevel:
    """The names directly under ``images`` (driver side: one listing call, no recursion)."""
    fs, root = storage.filesystem(images)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        raise EmbedError(f"images folder not found: {storage.redact(images)}")
    if storage.protocol(images) == "file":
        names = sorted(os.listdir(root))
    else:
        names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    names = [n for n in names if n and not hidden(n)]
    if not names:
        raise EmbedError(
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {storage.redact(images)}"
        )
    return TopLevel(root=storage.unstrip(images, root), names=names)


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def _walk_local(root: str, name: str) -> tuple[list[str], list[str], list[str]]:
    """Image files, symlinks leaving the root and ignored files under ``root/name``."""
    real_root = os.path.realpath(root)
    files, outside, ignored = [], [], []

    def consider(rel: str, full: str, is_dir: bool) -> None:
        if os.path.islink(full) and not _inside(os.path.realpath(full), real_root):
            if is_dir or posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
                outside.append(rel)
            else:
                ignored.append(rel)
            return
        if is_dir:
            if os.path.islink(full):
                ignored.append(rel)  # a link to a folder inside the root: listed where it is
            return
        if hidden(rel) or posixpath.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            ignored.append(rel)
        else:
            files.append(rel)

    top = os.path.join(root, name)
    if os.path.islink(top) or not os.path.isdir(top):
        consider(name, top, os.path.isdir(top))
        return files, outside, ignored
    for folder, dirs, names in os.walk(top, followlinks=False):
        sub = os.path.relpath(folder, top).replace(os.sep, "/")
        rel_folder = name if sub == "." else f"{name}/{sub}"
        for d in list(dirs):
            full = os.path.join(folder, d)
            if os.path.islink(full):
                consider(f"{rel_folder}/{d}", full, True)
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(folder, d)))
        for n in sorted(names):
            consider(f"{rel_folder}/{n}", os.path.join(folder, n), False)
    return files, outside, ignored


def _walk_remote(images: str, name: str) -> tuple[list[str], list[str], list[str]]:
    fs, root = storage.filesystem(images)
    root = root.rstrip("/")
    top = f"{root}/{name}"
    found = fs.find(top) if fs.isdir(top) else [top]
    files, ignored = [], []
    for p in found:
        rel = storage.relative(root, p)
        if hidden(rel) or posixpath.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            ignored.append(rel)
        else:
            files.append(rel)
    return files, [], ignored


def list_tree_shard(images: str, names: list[str]) -> tuple[pa.Table, dict]:
    """The listing of one shard of a tree (the top-level ``names``) and what it ignored."""
    fs, root = storage.filesystem(images)
    root = root.rstrip("/")
    rows: list[tuple[str, str | None, str]] = []
    ignored: list[str] = []
    for name in names:
        if storage.protocol(images) == "file":
            files, outside, skipped = _walk_local(root, name)
        else:
            files, outside, skipped = with_retries(
                lambda name=name: _walk_remote(images, name),
                what=f"listing {storage.redact(storage.join(images, name))}",
            )
        ignored += skipped
        rows += [(f, f.split("/", 1)[0] if "/" in f else None, "") for f in files]
        rows += [(f, f.split("/", 1)[0] if "/" in f else None, LINK_OUTSIDE) for f in outside]
    rows.sort(key=lambda r: r[0])
    table = pa.table(
        {
            "path": pa.array([r[0] for r in rows], pa.string()),
            "identity": pa.array([r[1] for r in rows], pa.string()),
            "listed_error": pa.array([r[2] for r in rows], pa.string()),
        },
        schema=LISTING_SCHEMA,
    )
    meta = {"rows": len(rows), "ignored": len(ignored), "ignored_examples": ignored[:3]}
    meta["links_outside"] = sum(1 for r in rows if r[2])
    return table, meta


# ----------------------------------------------------------------------------- manifests


def manifest_row_groups(uri: str) -> tuple[int, int]:
    """(row groups, rows) of a Parquet manifest, read from its footer only."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    return meta.num_row_groups, meta.num_rows


def csv_to_parquet(uri: str, target: str, rows_per_group: int) -> None:
    """Convert a CSV manifest into a Parquet file with row groups (done in a task)."""
    import pandas as pd
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    compression = "gzip" if path.lower().endswith(".gz") else None
    with fs.open(path, "rb") as f:
        frame = pd.read_csv(f, dtype=str, keep_default_na=False, compression=compression)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with storage.atomic_open(target) as out:
        pq.write_table(table, out, row_group_size=rows_per_group)


def read_row_group(uri: str, group: int, first_row: int, shards: int, where: str) -> list[pa.Table]:
    """Rows of one row group, normalised and split into ``shards`` buckets by path hash."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if "path" not in names:
            raise EmbedError(f"manifest {where} has no 'path' column (columns: {', '.join(names)})")
        columns = ["path", "identity"] if "identity" in names else ["path"]
        part = pf.read_row_group(group, columns=columns)
    raw = part.column("path").to_pylist()
    paths = [normalise_path(p, where, first_row + i) for i, p in enumerate(raw)]
    if "identity" in columns:
        identities = [
            None if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == "" else str(v)
            for v in part.column("identity").to_pylist()
        ]
    else:
        identities = [None] * len(paths)
    bucket = np.fromiter((shard_of(p, shards) for p in paths), dtype=np.int64, count=len(paths))
    out = []
    path_arr = np.asarray(paths, dtype=object)
    ident_arr = np.asarray(identities, dtype=object)
    rows = np.arange(len(paths), dtype=np.int64) + first_row
    for j in range(shards):
        keep = np.flatnonzero(bucket == j)
        out.append(
            pa.table(
                {
                    "path": pa.array(path_arr[keep].tolist(), pa.string()),
                    "identity": pa.array(ident_arr[keep].tolist(), pa.string()),
                    "row": pa.array(rows[keep], pa.int64()),
                }
            )
        )
    return out[0] if shards == 1 else out


def merge_manifest_shard(where: str, *buckets: pa.Table) -> tuple[pa.Table, dict]:
    """One shard's rows from every row group, sorted by path; repeated paths are reported."""
    if buckets:
        table = pa.concat_tables(buckets)
    else:
        table = pa.table({"path": pa.array([], pa.string()), "identity": pa.array([], pa.string())})
    table = table.sort_by("path") if table.num_rows else table
    paths = table.column("path").to_numpy(zero_copy_only=False)
    dup_mask = np.zeros(len(paths), dtype=bool)
    if len(paths) > 1:
        same = paths[1:] == paths[:-1]
        dup_mask[1:] |= same
        dup_mask[:-1] |= same
    duplicates = sorted(set(paths[dup_mask].tolist()))
    listing = pa.table(
        {
            "path": table.column("path"),
            "identity": table.column("identity"),
            "listed_error": pa.array([""] * table.num_rows, pa.string()),
        },
        schema=LISTING_SCHEMA,
    )
    meta = {
        "rows": table.num_rows,
        "ignored": 0,
        "ignored_examples": [],
        "links_outside": 0,
        "duplicate_rows": int(dup_mask.sum()),
        "duplicate_examples": duplicates[:5],
        "where": where,
    }
    return listing, meta
