"""The identify workflow: 1:N search of probes against a gallery, cosine against QMagFace.

``run_identification(config)`` is the library function behind ``qmag-ray identify``: it maps
the gallery and probe lists (or a data set layout) onto the embeddings, pools template lists,
searches every probe exactly against the whole gallery by cosine and by the QMagFace score
(one Ray task per gallery shard), and writes into ``config.output``::

    metrics.json        rank-1/5/10/20 (CMC of mated searches) and DIR at FPIR 1e-3/1e-2/1e-1
                        (open set, non-mated searches = probes whose identity is not enrolled),
                        for cosine and QMagFace, overall and per probe subset; counts and skips
    candidates.parquet  the top-20 candidates of every probe under both scores
    cmc.png             CMC curves (rank 1..20) of the mated searches, cosine and QMagFace
    dir_fpir.png        DIR against FPIR of the open-set searches (when some are non-mated)

The QMagFace score uses the per-image quality ``config.quality`` names (the MagFace norm by
default, or ``--quality-column``/``--quality-file``, read as calibrate and evaluate read it);
template entries carry the quality pooled from it.

Listed images missing from the embeddings and probes without an identity fail, listing them,
unless the matching ``on_*`` policy is ``skip``; skips are counted in the outcome.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qmag_ray import identification, plots, storage
from qmag_ray.embeddings import SHOW, EmbeddingTable, load_embeddings
from qmag_ray.errors import WorkflowError
from qmag_ray.pairs.resolve import Match, Policy, ResolveError, lookup_names
from qmag_ray.pairs.templates import TemplateTable, pool_templates
from qmag_ray.quality.columns import QualityInfo, with_chosen_quality
from qmag_ray.search.distributed import search_sharded
from qmag_ray.search.sets import SearchSet, layout_sets, read_set
from qmag_ray.search.topk import METHODS, TopK
from qmag_ray.workflows import reporting
from qmag_ray.workflows.config import IdentifyConfig
from qmag_ray.workflows.evaluate import load_calibration

logger = logging.getLogger(__name__)

CANDIDATES = max(identification.RANKS)


@dataclass(frozen=True, eq=False)
class Entries:
    """Gallery or probe entries: their embeddings (``path`` = entry name), identity, subset."""

    table: EmbeddingTable
    identity: np.ndarray
    subset: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class IdentificationOutcome:
    """Reports per score (``overall`` and per subset), counts, skips and files written."""

    reports: dict[str, dict[str, dict[str, Any]]]
    counts: dict[str, Any]
    files: dict[str, str]
    alpha: float
    beta: float
    notes: list[str] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def tracking_metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: ``<subset>.<score>.rank_<k>`` and
        ``<subset>.<score>.dir_at_fpir_<f>`` (subset ``overall`` or a probe subset), counts."""
        out: dict[str, float] = {"alpha": self.alpha, "beta": self.beta}
        for subset, reports in self.reports.items():
            for method, rep in reports.items():
                for k, v in rep["cmc"].items():
                    if v is not None:
                        out[f"{subset}.{method}.rank_{k}"] = float(v)
                for f, d in rep["dir_at_fpir"].items():
                    if d["dir"] is not None:
                        out[f"{subset}.{method}.dir_at_fpir_{f}"] = float(d["dir"])
        for key in ("gallery_entries", "probes", "distractors"):
            out[key] = float(self.counts[key])
        for key, v in self.counts["skipped"].items():
            out[f"skipped.{key}"] = float(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "scorer": {"alpha": self.alpha, "beta": self.beta},
            "quality": self.quality,
            "results": self.reports,
            "notes": self.notes,
            "definitions": {
                "cmc": "rank-k: fraction of mated searches whose mate is among the top k",
                "dir_at_fpir": "fraction of mated searches whose rank-1 candidate is the mate with "
                "a score above the lowest threshold at which at most FPIR of the non-mated "
                "searches (probe identity not enrolled) have a candidate",
                "qmagface": "ranked by s + min(0, beta s - alpha) * min(q_probe, q_gallery)",
            },
        }

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"gallery: {c['gallery_entries']} entries ({c['gallery_identities']} identities, "
            f"{c['distractors']} distractors); probes: {c['probes']}",
            f"QMagFace alpha = {self.alpha:.6f}, beta = {self.beta:.6f}",
        ]
        for subset, reports in self.reports.items():
            lines += ["", identification.format_report(reports, f"[{subset}] ")]
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        return "\n".join(lines)


def _rows(table: EmbeddingTable, paths: np.ndarray, cfg: IdentifyConfig, what: str) -> np.ndarray:
    """Row of each path in the embeddings; -1 for skipped ones (missing or unusable)."""
    rows = lookup_names(paths, table, cfg.prefix, Match(cfg.match))
    bad = np.zeros(len(table), dtype=bool)
    bad[table.bad_rows()] = True
    missing = (rows < 0) | bad[np.maximum(rows, 0)]
    if missing.any() and Policy(cfg.on_missing) is Policy.ERROR:
        names = ", ".join(repr(str(p)) for p in paths[missing][:SHOW])
        raise ResolveError(
            f"{int(missing.sum())} {what} image(s) are not in the embeddings (or unusable): "
            f"{names}{' ...' if missing.sum() > SHOW else ''} (matched {Match(cfg.match).value} "
            f"with prefix {cfg.prefix!r}); pass --on-missing skip to skip and count them"
        )
    return np.where(missing, -1, rows)


def build_entries(
    table: EmbeddingTable, sset: SearchSet, cfg: IdentifyConfig, what: str
) -> Entries:
    """The entries of a list: its images, or its pooled templates."""
    frame = sset.table
    paths = frame["path"].to_numpy(dtype=object)
    if sset.is_templates:
        templates = TemplateTable(
            image=paths,
            template=frame["template"].to_numpy(dtype=object),
            media=(frame["template"] + "\0" + frame["media"]).to_numpy(dtype=object),
            identity=frame["identity"].to_numpy(dtype=object),
            source=sset.source,
        )
        pooled, report = pool_templates(
            table,
            templates,
            cfg.pooling,
            prefix=cfg.prefix,
            match=Match(cfg.match),
            on_missing=Policy(cfg.on_missing),
        )
        subset_of = frame.groupby("template")["subset"].first()
        subset = np.array([subset_of.get(t) for t in pooled.path], dtype=object)
        return Entries(pooled, pooled.identity, subset, {"missing_images": report.missing_images})
    rows = _rows(table, paths, cfg, what)
    keep = rows >= 0
    entries = table.take(rows[keep])
    entries = EmbeddingTable(
        paths[keep], frame["identity"].to_numpy(object)[keep], entries.vectors, entries.quality
    )
    return Entries(
        entries,
        entries.identity,
        frame["subset"].to_numpy(object)[keep],
        {"missing_images": int((~keep).sum())},
    )


def _drop_unlabelled(probes: Entries, cfg: IdentifyConfig) -> tuple[Entries, int]:
    unlabelled = np.array([x is None for x in probes.identity], dtype=bool)
    if not unlabelled.any():
        return probes, 0
    if Policy(cfg.on_unlabelled) is Policy.ERROR:
        names = ", ".join(repr(str(p)) for p in probes.table.path[unlabelled][:SHOW])
        raise ResolveError(
            f"{int(unlabelled.sum())} probe(s) have no identity: {names}; a probe must say who it "
            "is (an identity not in the gallery makes it a non-mated search); pass "
            "--on-unlabelled skip to skip and count them"
        )
    keep = np.flatnonzero(~unlabelled)
    kept = Entries(
        probes.table.take(keep), probes.identity[keep], probes.subset[keep], probes.skipped
    )
    return kept, int(unlabelled.sum())


def _sets(table: EmbeddingTable, cfg: IdentifyConfig) -> tuple[SearchSet, SearchSet]:
    if cfg.layout:
        return layout_sets(cfg.layout, table.path)
    assert cfg.gallery and cfg.probes
    return read_set(cfg.gallery, "gallery"), read_set(cfg.probes, "probe")


def candidates_frame(results: dict[str, TopK], gallery: Entries, probes: Entries) -> pd.DataFrame:
    """Long table: probe, method, rank, gallery entry, its identity, score."""
    frames = []
    for method, top in results.items():
        p, k = top.index.shape
        idx = top.index.ravel()
        ok = idx >= 0
        frames.append(
            pd.DataFrame(
                {
                    "probe": np.repeat(probes.table.path, k)[ok],
                    "method": method,
                    "rank": np.tile(np.arange(1, k + 1), p)[ok],
                    "gallery": gallery.table.path[idx[ok]],
                    "identity": gallery.identity[idx[ok]],
                    "score": top.score.ravel()[ok].astype(np.float64),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def run_identification(
    config: IdentifyConfig, *, use_ray: bool = True, shards: int | None = None
) -> IdentificationOutcome:
    """Search, measure and write metrics.json and candidates.parquet (module docstring).

    Raises:
        ResolveError, SetError, TemplateError, EmbeddingsError, ValueError: unusable input.
    """
    cfg = config
    scorer = load_calibration(cfg)
    expected_quality = scorer.extra.get("quality_column", "quality")
    if cfg.calibration and expected_quality != cfg.quality.column:
        raise WorkflowError(
            f"the calibration was fitted with quality {expected_quality!r} but --quality-column "
            f"is {cfg.quality.column!r}: alpha and beta are on that quality's scale; identify "
            f"with --quality-column {expected_quality} or calibrate on {cfg.quality.column!r}"
        )
    table, qinfo = with_chosen_quality(load_embeddings(cfg.embeddings), cfg.embeddings, cfg.quality)
    gset, pset = _sets(table, cfg)
    gallery = build_entries(table, gset, cfg, "gallery")
    probes, n_unlabelled = _drop_unlabelled(build_entries(table, pset, cfg, "probe"), cfg)
    if len(gallery.table) == 0 or len(probes.table) == 0:
        raise ResolveError("nothing to search: the gallery or the probe list is empty after skips")
    if shards is None:
        shards = cfg.shards or (_cluster_cpus() * 2 if use_ray else 1)
    logger.info(
        "searching %d probes against %d gallery entries (%d shard(s))",
        len(probes.table),
        len(gallery.table),
        shards,
    )
    results = search_sharded(
        probes.table.vectors,
        gallery.table.vectors,
        CANDIDATES,
        scorer.alpha,
        scorer.beta,
        shards=shards,
        q_probes=probes.table.quality,
        q_gallery=gallery.table.quality,
        use_ray=use_ray,
    )
    reports: dict[str, dict[str, dict[str, Any]]] = {}
    subsets = sorted({str(s) for s in probes.subset if s is not None})
    for name in ["overall", *subsets]:
        mask = (
            np.ones(len(probes.table), bool)
            if name == "overall"
            else np.array([str(s) == name for s in probes.subset], dtype=bool)
        )
        reports[name] = {
            m: identification.identification_report(
                results[m].index[mask],
                results[m].score[mask],
                gallery.identity,
                probes.identity[mask],
            )
            for m in METHODS
        }
    counts = {
        "gallery_entries": len(gallery.table),
        "gallery_identities": len({x for x in gallery.identity if x is not None}),
        "distractors": int(sum(x is None for x in gallery.identity)),
        "probes": len(probes.table),
        "gallery_source": gset.source,
        "probe_source": pset.source,
        "skipped": {
            "gallery_missing_images": gallery.skipped.get("missing_images", 0),
            "probe_missing_images": probes.skipped.get("missing_images", 0),
            "unlabelled_probes": n_unlabelled,
        },
        "shards": shards,
    }
    notes = [n for n in (qinfo.note(),) if n]
    skipped = counts["skipped"]
    if any(skipped.values()):
        notes.append(
            "skipped: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if v)
        )
    quality = qinfo.to_dict()
    params = _params(cfg, qinfo, shards)
    outcome = IdentificationOutcome(
        reports, counts, {}, scorer.alpha, scorer.beta, notes, quality, params
    )
    mated = _mated(gallery, probes)
    ranks = {
        m: identification.mate_ranks(
            results[m].index[mated], gallery.identity, probes.identity[mated]
        )
        for m in METHODS
    }
    files = {
        "metrics.json": reporting.write_json(
            storage.join(cfg.output, "metrics.json"), outcome.to_dict()
        ),
        "candidates.parquet": _write_parquet(
            storage.join(cfg.output, "candidates.parquet"),
            candidates_frame(results, gallery, probes),
        ),
    }
    if mated.any():
        files["cmc.png"] = plots.cmc_curves(storage.join(cfg.output, "cmc.png"), ranks, CANDIDATES)
    if (~mated).any() and mated.any():
        top1 = {m: results[m].score[:, 0].astype(np.float64) for m in METHODS}
        files["dir_fpir.png"] = plots.dir_fpir_curves(
            storage.join(cfg.output, "dir_fpir.png"),
            {m: top1[m][mated] for m in METHODS},
            {m: ranks[m] == 1 for m in METHODS},
            {m: top1[m][~mated] for m in METHODS},
        )
    return IdentificationOutcome(
        reports, counts, files, scorer.alpha, scorer.beta, notes, quality, params
    )


def _mated(gallery: Entries, probes: Entries) -> np.ndarray:
    enrolled = {str(x) for x in gallery.identity if x is not None}
    return np.array([str(x) in enrolled for x in probes.identity], dtype=bool)


def _params(cfg: IdentifyConfig, qinfo: QualityInfo, shards: int) -> dict[str, Any]:
    """The run's settings for MLflow (URIs redacted)."""
    return {
        "embeddings": storage.redact(cfg.embeddings),
        "gallery": storage.redact(cfg.gallery) if cfg.gallery else "",
        "probes": storage.redact(cfg.probes) if cfg.probes else "",
        "layout": cfg.layout.value if cfg.layout else "",
        "calibration": storage.redact(cfg.calibration) if cfg.calibration else "",
        "quality_column": qinfo.column,
        "quality_source": qinfo.source,
        "pooling": str(getattr(cfg.pooling, "value", cfg.pooling)),
        "match": str(getattr(cfg.match, "value", cfg.match)),
        "prefix": cfg.prefix,
        "on_missing": str(getattr(cfg.on_missing, "value", cfg.on_missing)),
        "on_unlabelled": str(getattr(cfg.on_unlabelled, "value", cfg.on_unlabelled)),
        "shards": shards,
        "candidates": CANDIDATES,
    }


def _write_parquet(uri: str, frame: pd.DataFrame) -> str:
    with storage.atomic_open(uri) as f:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), f)
    return uri


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
