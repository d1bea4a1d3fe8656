"""The reports an evaluation writes beside metrics.json: score files, bootstrap intervals,
d', the quality evaluation (EDC of several measures) and per-group differentials.

``write_extra_reports`` is called by ``run_evaluation`` with the pairs it scored; it returns
what goes into metrics.json, the files written and notes for the user.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmag_ray import plots, storage
from qmag_ray.embeddings import EmbeddingTable
from qmag_ray.quality.columns import image_values, with_quality
from qmag_ray.quality.edc import QualityEvaluation, evaluate_quality
from qmag_ray.reports.bootstrap import BootstrapReport, distribution_stats, identity_bootstrap
from qmag_ray.reports.groups import GroupReport, group_report
from qmag_ray.reports.scorefiles import score_file_frame
from qmag_ray.workflows.config import EvaluateConfig

logger = logging.getLogger(__name__)

SYSTEMS = {"cosine": "cosine", "qmagface": "QMagFace"}
SCORE_CHUNK = 1_000_000


@dataclass
class ExtraReports:
    """What the extra reports produced (JSON sections, files, notes, console text)."""

    doc: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    bootstrap: dict[str, BootstrapReport] = field(default_factory=dict)
    quality: QualityEvaluation | None = None
    groups: list[GroupReport] = field(default_factory=list)


def _measures(
    cfg: EvaluateConfig, table: EmbeddingTable, base: EmbeddingTable
) -> dict[str, np.ndarray]:
    """Per-row values of every compared quality measure (NaN where missing)."""
    names = list(cfg.quality.compare) or [cfg.quality.column]
    out = {}
    for name in names:
        if name == cfg.quality.column:
            out[name] = table.quality.astype(np.float64)
            continue
        if name == "quality":
            # the norm, from the table as loaded (before another column replaced it)
            idx = base.index_of(list(table.path))
            out[name] = base.quality[idx].astype(np.float64)
            continue
        sub, _ = with_quality(table, cfg.embeddings, name, cfg.quality.file)
        values = np.full(len(table), np.nan)
        values[table.index_of(list(sub.path))] = sub.quality
        out[name] = values
    return out


def write_extra_reports(
    cfg: EvaluateConfig,
    *,
    table: EmbeddingTable,
    base_table: EmbeddingTable,
    idx_a: np.ndarray,
    idx_b: np.ndarray,
    cosine: np.ndarray,
    qmagface: np.ndarray,
    labels: np.ndarray,
    fmrs: tuple[float, ...],
) -> ExtraReports:
    """Score files, intervals, d', quality evaluation and group reports under ``cfg.output``."""
    out = ExtraReports()
    rep = cfg.report
    systems = {"cosine": cosine, "qmagface": qmagface}
    id_a, id_b = table.identity[idx_a], table.identity[idx_b]
    if rep.score_files:
        for system in systems:
            # written SCORE_CHUNK pairs at a time: bounded memory for IJB-C's 15.6M pairs
            uri = storage.join(cfg.output, "scores", f"{system}.csv")
            with storage.atomic_open(uri) as f:
                for s in range(0, max(1, len(labels)), SCORE_CHUNK):
                    r = slice(s, s + SCORE_CHUNK)
                    frame = score_file_frame(
                        path_a=table.path[idx_a[r]],
                        id_a=id_a[r],
                        path_b=table.path[idx_b[r]],
                        id_b=id_b[r],
                        label=labels[r],
                        cosine=cosine[r],
                        qmagface=qmagface[r],
                        quality_a=table.quality[idx_a[r]],
                        quality_b=table.quality[idx_b[r]],
                        system=system,
                    )
                    f.write(frame.to_csv(index=False, header=s == 0, float_format="%.9g").encode())
            out.files[f"scores/{system}.csv"] = uri
    out.doc["distributions"] = {s: distribution_stats(v, labels) for s, v in systems.items()}
    if rep.bootstrap:
        for system, values in systems.items():
            out.bootstrap[system] = identity_bootstrap(
                values,
                labels,
                id_a,
                id_b,
                fmrs,
                replicates=rep.bootstrap,
                level=rep.level,
                seed=rep.seed,
            )
        out.doc["bootstrap"] = {s: b.to_dict() for s, b in out.bootstrap.items()}
        out.text.append(_interval_table(out.bootstrap, out.doc["distributions"], rep.level))
    plots_dir = storage.join(cfg.output, "plots")
    det = plots.det_curves(
        storage.join(plots_dir, "det.png"),
        {SYSTEMS[s]: v for s, v in systems.items()},
        labels,
        intervals={SYSTEMS[s]: b.to_dict() for s, b in out.bootstrap.items()} or None,
    )
    out.files["plots/det.png"] = det
    # quality evaluation: every compared measure on the same pairs
    pooled = bool(getattr(cfg, "templates", None))
    if pooled and (cfg.quality.compare or rep.groups):
        out.notes.append(
            "templates: the quality evaluation uses the templates' pooled quality only and no "
            "group report is made (per-image columns do not apply to templates)"
        )
    per_row = (
        {cfg.quality.column: table.quality.astype(np.float64)}
        if pooled
        else _measures(cfg, table, base_table)
    )
    pair_q = {n: np.minimum(v[idx_a], v[idx_b]) for n, v in per_row.items()}
    usable = np.logical_and.reduce([np.isfinite(v) for v in pair_q.values()])
    if not usable.all():
        out.notes.append(
            f"quality evaluation on the {int(usable.sum())} of {len(usable)} pairs where every "
            f"measure ({', '.join(pair_q)}) has a value"
        )
    try:
        qe = evaluate_quality(
            cosine[usable],
            labels[usable],
            {n: v[usable] for n, v in pair_q.items()},
            fmr=cfg.edc_fmr,
            limit=cfg.quality.edc_limit,
            pauc_limit=cfg.quality.pauc_limit,
        )
    except ValueError as exc:
        out.notes.append(f"quality evaluation skipped: {exc}")
    else:
        out.quality = qe
        out.doc["quality_evaluation"] = qe.to_dict()
        out.files["plots/quality_edc.png"] = plots.quality_edc(
            storage.join(plots_dir, "quality_edc.png"), qe.to_dict()
        )
        out.text.append(qe.format_table())
    for column in () if pooled else rep.groups:
        values, source = image_values(
            table, cfg.embeddings, column, rep.group_file, flag="--group-column"
        )
        values = np.array([None if _missing(v) else str(v) for v in values], dtype=object)
        gr = group_report(
            column,
            values[idx_a],
            values[idx_b],
            labels,
            {"cosine": cosine, "qmagface": qmagface},
            values,
            table.quality,
            fmr=cfg.edc_fmr,
            quality_measure=cfg.quality.column,
        )
        out.groups.append(gr)
        out.doc.setdefault("groups", {})[column] = {**gr.to_dict(), "source": source}
        uri = storage.join(plots_dir, f"quality_by_{_safe(column)}.png")
        out.files[f"plots/quality_by_{_safe(column)}.png"] = plots.group_quality(
            uri, {g: table.quality[values == g] for g in gr.groups}, cfg.quality.column, column
        )
        out.text.append(gr.format_table())
    return out


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _interval_table(
    boot: dict[str, BootstrapReport], dist: dict[str, dict[str, Any]], level: float
) -> str:
    first = next(iter(boot.values()))
    head = (
        f"{level:.0%} intervals, bootstrap over {first.n_units} "
        f"{'identities' if first.unit == 'identity' else 'pairs'} ({first.replicates} replicates)"
    )
    keys = list(first.fnmr_at_fmr)
    rows = [
        (f"FNMR % @ FMR {k}", *(boot[s].fnmr_at_fmr[k].format_pct() for s in boot)) for k in keys
    ]
    rows.append(("EER %", *(boot[s].eer.format_pct() for s in boot)))
    for stat in ("genuine_mean", "genuine_std", "impostor_mean", "impostor_std", "d_prime"):
        rows.append((stat, *(_num(dist[s][stat]) for s in boot)))
    width = max(len(r[0]) for r in rows)
    names = [SYSTEMS[s] for s in boot]
    lines = [head, f"{'':<{width}}  " + "  ".join(f"{n:>28}" for n in names)]
    lines += [f"{r[0]:<{width}}  " + "  ".join(f"{c:>28}" for c in r[1:]) for r in rows]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
