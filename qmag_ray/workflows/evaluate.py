"""The evaluate workflow: cosine against QMagFace on a pair protocol, side by side.

``run_evaluation(config)`` is the library function behind ``qmag-ray evaluate``: it maps a
benchmark pair file (or a generic pair list) onto the embeddings, scores every pair (one Ray
task per shard when ``use_ray``), and writes into ``config.output``::

    metrics.json    FNMR@FMR, EER, AUC, 10-fold accuracy with std, EDC for both scores;
                    the calibration used, the pairs' resolve report (skips counted) and, when
                    the calibration has operating thresholds, FMR/FNMR measured at them
    plots/*.png     DET curves (normal-deviate axes, bootstrap intervals), quality
                    histograms, EDC, the quality evaluation (EDC of several measures) and
                    quality by group
    scores/*.csv    per-pair score files in bob.bio's CSV layout (cosine.csv, qmagface.csv)

A benchmark list naming images that are not in the embeddings fails, listing them, unless
``on_missing`` is ``skip``; then the skipped pairs and images are counted in the outcome.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmag_ray import metrics, storage
from qmag_ray.calibration.result import QMagFaceCalibration
from qmag_ray.embeddings import load_embeddings
from qmag_ray.errors import WorkflowError
from qmag_ray.fmr import measurable
from qmag_ray.pairs.listed import ListedPairSource
from qmag_ray.pairs.scoring import pair_arrays
from qmag_ray.pairs.settings import Pooling
from qmag_ray.pairs.sides import read_listed, templates_table
from qmag_ray.quality.columns import with_chosen_quality
from qmag_ray.workflows import reporting
from qmag_ray.workflows.config import EvaluateConfig, ScorerSettings
from qmag_ray.workflows.extra_reports import ExtraReports, write_extra_reports
from qmag_ray.workflows.provenance import (
    EmbeddingInput,
    check_embedding_input,
    embedding_provenance,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class EvaluationOutcome:
    """What an evaluation produced: the report, the files written and the pairs used."""

    calibration: QMagFaceCalibration
    output: str
    files: dict[str, str]
    report: dict[str, Any]
    pairs: dict[str, Any]
    params: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    tar_at_far: dict[str, Any] | None = None
    extra: ExtraReports | None = None

    def tracking_metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow (``qmagface.fnmr_at_fmr_1e-03``...), alpha, beta, skips."""
        out = {
            "alpha": self.calibration.alpha,
            "beta": self.calibration.beta,
            "pairs_skipped": float(self.pairs["resolve"]["skipped"]),
            **reporting.flat_metrics(self.report),
        }
        if self.extra is not None:
            for system, dist in self.extra.doc.get("distributions", {}).items():
                if dist.get("d_prime") is not None:
                    out[f"{system}.d_prime"] = float(dist["d_prime"])
            if self.extra.quality is not None:
                for name, curve in self.extra.quality.curves.items():
                    out[f"quality_edc.{name}.pauc"] = curve.pauc
        if self.tar_at_far is not None:
            for conv in ("iso", "nearest"):
                for name, row in self.tar_at_far[conv].items():
                    for key, value in row.items():
                        if value is not None:
                            out[f"{name}.tar_at_far_{key}.{conv}"] = float(value)
        return out

    def summary(self) -> str:
        """The console report: pairs used, the cosine vs QMagFace table, notes."""
        cal = self.calibration
        lines = [
            f"{self.pairs['uri']} ({self.pairs['protocol']}): {self.pairs['summary']}",
            f"QMagFace alpha = {cal.alpha:.6f}, beta = {cal.beta:.6f}",
            "",
            metrics.format_table(self.report),
        ]
        if self.tar_at_far is not None:
            lines += ["", metrics.format_tar_table(self.tar_at_far)]
        if self.extra is not None:
            for block in self.extra.text:
                lines += ["", block]
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        lines += ["", f"results in {storage.redact(self.output)}"]
        return "\n".join(lines)


def load_calibration(cfg: ScorerSettings) -> QMagFaceCalibration:
    """The calibration file of ``cfg``, or a bare calibration from its ``alpha`` and ``beta``
    (``tracking.consumer.load_scorer`` is the registry's: a model URI to a scorer)."""
    if cfg.calibration:
        try:
            return QMagFaceCalibration.from_file(cfg.calibration)
        except FileNotFoundError:
            raise WorkflowError(
                f"calibration file not found: {storage.redact(cfg.calibration)}"
            ) from None
    assert cfg.alpha is not None and cfg.beta is not None
    return QMagFaceCalibration(alpha=cfg.alpha, beta=cfg.beta, method="given")


def at_operating_thresholds(
    cal: QMagFaceCalibration, qmag: np.ndarray, label: np.ndarray
) -> dict[str, dict[str, float]]:
    """FMR and FNMR measured on these pairs at the calibration's stored thresholds."""
    gen, imp = qmag[label == 1], qmag[label == 0]
    out = {}
    for key, thr in sorted(cal.thresholds.items(), key=lambda kv: float(kv[0])):
        out[key] = {
            "threshold": float(thr),
            "fmr": float(np.mean(imp >= thr)) if len(imp) else float("nan"),
            "fnmr": float(np.mean(gen < thr)) if len(gen) else float("nan"),
        }
    return out


def check_calibration_model(
    cal: QMagFaceCalibration, checked: EmbeddingInput, cfg: EvaluateConfig
) -> str:
    """Refuse a calibration fitted on embeddings of another model (unless allowed)."""
    fitted = (cal.extra.get("embeddings") or {}).get("embed_model_sha256")
    if not fitted or not checked.model_sha256 or fitted == checked.model_sha256:
        return ""
    text = (
        f"the calibration was fitted on embeddings of model sha256 {str(fitted)[:12]}... but "
        f"{storage.redact(cfg.embeddings)} was embedded with model sha256 "
        f"{checked.model_sha256[:12]}..."
    )
    if not cfg.allow_other_model:
        raise WorkflowError(
            f"{text}; calibrate on this model's embeddings, or pass --allow-other-model"
        )
    logger.warning("%s; applied anyway (--allow-other-model)", text)
    return f"{text}; applied anyway (--allow-other-model)"


def sorted_by_label_note(label: np.ndarray, protocol: str) -> str | None:
    """A warning when a generic pair list is sorted by label: its 10-fold accuracy (folds in
    file order, as the benchmarks define them) would then test folds of one class only."""
    y = np.asarray(label).ravel()
    if protocol != "generic" or len(y) < 20 or y.min() == y.max():
        return None
    if np.count_nonzero(np.diff(y)) > 1:
        return None
    return (
        "the pair list is sorted by label (all pairs of one label, then the other): the 10-fold "
        "accuracy, formed over folds in file order, is then meaningless; shuffle its rows "
        "(e.g. pandas .sample(frac=1, random_state=0)) and evaluate again"
    )


def run_evaluation(config: EvaluateConfig, *, use_ray: bool = True) -> EvaluationOutcome:
    """Evaluate cosine and QMagFace on ``config.pairs`` and write metrics.json and plots.

    Raises:
        WorkflowError, EmbeddingsError, PairFileError, ResolveError, ValueError: input that
            cannot be used (named in the message): user errors for the entry point.
    """
    cfg = config
    cal = load_calibration(cfg)
    checked = check_embedding_input(cfg.embeddings, allow_incomplete=cfg.allow_incomplete)
    model_note = check_calibration_model(cal, checked, cfg)
    base_table = load_embeddings(cfg.embeddings)
    table, qinfo = with_chosen_quality(base_table, cfg.embeddings, cfg.quality)
    expected_quality = cal.extra.get("quality_column", "quality")
    if cfg.calibration and expected_quality != cfg.quality.column:
        raise WorkflowError(
            f"the calibration was fitted with quality {expected_quality!r} but --quality-column "
            f"is {cfg.quality.column!r}: alpha and beta are on that quality's scale; evaluate "
            f"with --quality-column {expected_quality} or calibrate on {cfg.quality.column!r}"
        )
    table, pooled = templates_table(table, cfg)
    expected_dim = cal.extra.get("embedding_dim")
    if expected_dim is not None and int(expected_dim) != table.dim:
        raise WorkflowError(
            f"the calibration was fitted on {expected_dim}-d embeddings but "
            f"{storage.redact(cfg.embeddings)} holds {table.dim}-d embeddings: another model"
        )
    resolved, protocol = read_listed(table, cfg.pairs, cfg.protocol, cfg)
    report_ = resolved.report
    notes = [n for n in (checked.note, model_note, qinfo.note()) if n]
    if pooled is not None and pooled.missing_images:
        notes.append(
            f"{pooled.missing_images} image(s) of the template table are not in the embeddings "
            "and were left out of their templates"
        )
    if report_.skipped:
        notes.append(
            f"{report_.skipped} of {report_.total} pairs skipped ({report_.summary()}); "
            f"{report_.missing_images} distinct image(s) missing; the 10-fold split is formed "
            f"over the {report_.kept} kept pairs in file order"
        )
        logger.warning("%s", notes[-1])
    shards = max(1, min(64, len(resolved) // 250_000)) if use_ray else 1
    source = ListedPairSource(table, resolved, shards=shards)
    logger.info("scoring %d pairs in %d shard(s)", len(resolved), shards)
    cos, q, y = pair_arrays(source, use_ray=use_ray)
    sorted_note = sorted_by_label_note(y, protocol)
    if sorted_note:
        notes.append(sorted_note)
        logger.warning("%s", sorted_note)
    rep = reporting.report(cos, q, y, cal, edc_fmr=cfg.edc_fmr)
    qmag = cal.score(cos, q)
    tar = None
    if pooled is not None:
        tar = metrics.tar_table({"cosine": cos, "qmagface": qmag}, y)
    pairs_info = {
        "uri": storage.redact(cfg.pairs),
        "protocol": protocol,
        "resolve": report_.to_dict(),
        "summary": report_.summary(),
    }
    doc = {
        "pairs": pairs_info,
        "embeddings": {
            "uri": storage.redact(cfg.embeddings),
            "n_images": len(table),
            "dim": table.dim,
            "fingerprint": table.fingerprint(),
            **embedding_provenance(cfg.embeddings),
            **checked.to_dict(),
        },
        "calibration": {
            "uri": storage.redact(cfg.calibration) if cfg.calibration else None,
            "alpha": cal.alpha,
            "beta": cal.beta,
            "method": cal.method,
            "fingerprint": cal.fingerprint,
        },
        "report": rep,
        "tar_at_far": tar,
        "templates": None
        if pooled is None
        else {
            "uri": storage.redact(cfg.templates or ""),
            "pooling": Pooling(cfg.pooling).value,
            **pooled.to_dict(),
        },
        "at_calibration_thresholds": at_operating_thresholds(cal, qmag, y),
        "notes": notes,
    }
    files = {"metrics.json": storage.join(cfg.output, "metrics.json")}
    plots_dir = storage.join(cfg.output, "plots")
    figures = reporting.write_figures(
        plots_dir, cos, q, y, cal, rep, with_calibration_plot=False, subset="evaluation"
    )
    for uri in figures:
        files[storage.join("plots", uri[len(plots_dir.rstrip("/")) + 1 :])] = uri
    extra = write_extra_reports(  # a QualityColumnError is a WorkflowError (a user error)
        cfg,
        table=table,
        base_table=base_table,
        idx_a=resolved.idx_a,
        idx_b=resolved.idx_b,
        cosine=cos,
        qmagface=qmag,
        labels=y,
        fmrs=tuple(f for f in metrics.REPORT_FMRS if measurable(f, int((y == 0).sum()))),
    )
    files.update(extra.files)
    notes += extra.notes
    doc.update(extra.doc)
    doc["quality"] = qinfo.to_dict()
    reporting.write_json(files["metrics.json"], doc)
    params = {
        "embeddings": storage.redact(cfg.embeddings),
        "pairs": pairs_info["uri"],
        "protocol": pairs_info["protocol"],
        "calibration": doc["calibration"]["uri"],
        "alpha": cal.alpha,
        "beta": cal.beta,
        "edc_fmr": cfg.edc_fmr,
        "on_missing": cfg.on_missing.value,
        "embeddings_fingerprint": table.fingerprint(),
        "embedding_model": doc["embeddings"],
        "quality_column": cfg.quality.column,
        "quality_file": storage.redact(cfg.quality.file) if cfg.quality.file else None,
        "bootstrap_replicates": cfg.report.bootstrap,
    }
    if pooled is not None:
        params["templates"] = doc["templates"]["uri"]
        params["pooling"] = doc["templates"]["pooling"]
    return EvaluationOutcome(cal, cfg.output, files, rep, pairs_info, params, notes, tar, extra)
