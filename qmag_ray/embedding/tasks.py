"""Listing, planning and checking the shards of an embedding run as Ray tasks.

The driver submits one task per shard (and, for manifests, one per row group) and keeps only
the object references of the shards' listings and todo tables and the small dicts of counts
the tasks return; the tables themselves stay in the object store of the nodes that made them.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

from qmag_ray import storage
from qmag_ray.embedding import accounting, listing
from qmag_ray.embedding.config import EmbedConfig, EmbedError
from qmag_ray.embedding.output import OutputLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where the inputs come from, as far as the driver looks (before any Ray work).

    Attributes:
        root: URI the input paths are relative to.
        top_level: a tree's first-level names (None for a manifest).
        manifest: the manifest URI (None for a tree).
        units: top-level entries or manifest rows (-1: a CSV manifest, not counted yet).
    """

    root: str
    top_level: list[str] | None
    manifest: str | None
    units: int

    def default_shards(self) -> int:
        per = (
            listing.TOP_LEVEL_PER_SHARD
            if self.top_level is not None
            else (listing.MANIFEST_ROWS_PER_SHARD)
        )
        return listing.shard_count(max(self.units, 1), per)


def describe_source(config: EmbedConfig) -> Source:
    """Check that the inputs exist and look at their first level (driver, no Ray)."""
    if config.images:
        top = listing.list_top_level(config.images)
        return Source(root=top.root, top_level=top.names, manifest=None, units=len(top.names))
    assert config.manifest is not None
    uri = config.manifest
    where = storage.redact(uri)
    if not storage.exists(uri):
        raise EmbedError(f"manifest not found: {where}")
    root = config.images_root or storage.unstrip(uri, posixpath.dirname(storage.filesystem(uri)[1]))
    lower = uri.lower()
    if lower.endswith((".parquet", ".pq")):
        try:
            groups, rows = listing.manifest_row_groups(uri)
        except Exception as exc:
            raise EmbedError(f"manifest {where} is not a readable Parquet file ({exc})") from None
        if rows == 0:
            raise EmbedError(f"manifest {where} has no rows")
        return Source(root=root, top_level=None, manifest=uri, units=rows)
    if lower.endswith((".csv", ".csv.gz", ".txt")):
        return Source(root=root, top_level=None, manifest=uri, units=-1)
    raise EmbedError(f"manifest {where} must be a .csv or .parquet file")


def _remote(fn: Any, config: EmbedConfig, **options: Any) -> Any:
    import ray

    opts: dict[str, Any] = {"num_cpus": 1, **options}
    if config.resources:
        opts["resources"] = dict(config.resources)
    return ray.remote(fn).options(**opts)


def parquet_manifest(config: EmbedConfig, source: Source, layout: OutputLayout) -> str:
    """The manifest as Parquet row groups: itself, or a CSV converted in a task."""
    import ray

    assert source.manifest is not None
    if source.units >= 0:
        return source.manifest
    target = storage.join(layout.inputs, "manifest.parquet")
    convert = _remote(listing.csv_to_parquet, config)
    ray.get(convert.remote(source.manifest, target, listing.MANIFEST_ROWS_PER_SHARD))
    return target


def list_shards(
    config: EmbedConfig, source: Source, shards: int, layout: OutputLayout
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Submit the listing tasks; return the shards' listing references and their counts.

    Raises:
        EmbedError: no inputs at all, or a manifest that lists a path more than once.
    """
    import ray

    if source.top_level is not None:
        groups: list[list[str]] = [[] for _ in range(shards)]
        for name in source.top_level:
            groups[listing.shard_of(name, shards)].append(name)
        task = _remote(listing.list_tree_shard, config, num_returns=2)
        pairs = [task.remote(source.root, names) for names in groups]
    else:
        manifest = parquet_manifest(config, source, layout)
        where = storage.redact(source.manifest or manifest)
        n_groups, _ = listing.manifest_row_groups(manifest)
        firsts = _row_group_starts(manifest)
        reader = _remote(listing.read_row_group, config, num_returns=shards)
        buckets = []
        for g in range(n_groups):
            refs = reader.remote(manifest, g, firsts[g], shards, where)
            buckets.append([refs] if shards == 1 else list(refs))
        merge = _remote(listing.merge_manifest_shard, config, num_returns=2)
        pairs = [merge.remote(where, *[b[j] for b in buckets]) for j in range(shards)]
    listings = [p[0] for p in pairs]
    try:
        metas = ray.get([p[1] for p in pairs])
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), EmbedError) else None
        if cause is not None:
            raise EmbedError(str(cause)) from None
        raise EmbedError(f"listing the inputs failed: {str(exc).splitlines()[-1]}") from None
    total = sum(m["rows"] for m in metas)
    duplicates = sum(m.get("duplicate_rows", 0) for m in metas)
    if duplicates:
        examples = sorted(e for m in metas for e in m.get("duplicate_examples", []))[:5]
        raise EmbedError(
            f"manifest {storage.redact(source.manifest or '')} lists {duplicates} rows with "
            f"repeated paths after normalisation (e.g. {', '.join(examples)}); each image must "
            "appear once"
        )
    if total == 0:
        what = storage.redact(
            source.root if source.top_level is not None else source.manifest or ""
        )
        raise EmbedError(
            f"no image files under {what}"
            if source.top_level is not None
            else f"manifest {what} has no rows"
        )
    ignored = sum(m["ignored"] for m in metas)
    if ignored:
        examples = [e for m in metas for e in m["ignored_examples"]][:3]
        logger.warning(
            "1 file under %s is not an image and was not taken as an input (%s)"
            if ignored == 1
            else f"{ignored} files under %s are not images and were not taken as inputs (e.g. %s)",
            storage.redact(source.root),
            ", ".join(examples),
        )
    links = sum(m.get("links_outside", 0) for m in metas)
    if links:
        logger.warning(
            "%d symbolic links under %s point outside it: recorded as failures, not read",
            links,
            storage.redact(source.root),
        )
    return listings, metas


def _row_group_starts(manifest: str) -> list[int]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(manifest)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    starts, at = [], 0
    for g in range(meta.num_row_groups):
        starts.append(at)
        at += meta.row_group(g).num_rows
    return starts


def plan_shards(
    config: EmbedConfig, listings: list[Any], output: str
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Submit the planning tasks; return the todo references (non-empty ones) and counts."""
    import ray

    task = _remote(accounting.plan_shard, config, num_returns=2)
    pairs = [task.remote(ref, output, j) for j, ref in enumerate(listings)]
    metas = ray.get([p[1] for p in pairs])
    stray = sum(m["stray"] for m in metas)
    if stray:
        examples = [e for m in metas for e in m["stray_examples"]][:3]
        raise EmbedError(
            f"{storage.redact(output)} holds results for {stray} paths that are not among the "
            f"inputs (e.g. {', '.join(examples)}); pass --overwrite or choose another --output"
        )
    todo = [p[0] for p, m in zip(pairs, metas, strict=True) if m["todo"]]
    return todo, metas


def check_shards(
    config: EmbedConfig, listings: list[Any], output: str, model_sha256: str
) -> list[dict[str, Any]]:
    """Submit the checking tasks; return their counts."""
    import ray

    task = _remote(accounting.check_shard, config)
    return ray.get([task.remote(ref, output, j, model_sha256) for j, ref in enumerate(listings)])
