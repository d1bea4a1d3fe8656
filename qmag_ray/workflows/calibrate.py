"""The calibrate workflow: embeddings -> pairs -> fit on Ray -> held-out check -> result files.

``run_calibration(config)`` is the library function behind ``qmag-ray calibrate``. It expects
Ray to be connected by the entry point (``use_ray=False`` runs everything in this process, for
notebooks and tests), records nothing in MLflow (the entry point does, from the outcome) and
writes into ``config.output``::

    calibration.json        alpha, beta, grid, thresholds; extra["validation"] holds the
                            held-out table and the guard (and, with compare_methods,
                            extra["validation"]["methods"]: every method's held-out figures)
    metrics.json            in-sample and held-out verification reports, validation, notes
    grid_table.csv          per-FMR optimal weight, threshold and FNMR of every weight
    held_out.csv            held-out FNMR at every FMR point, cosine vs QMagFace
    held_out_methods.csv    with compare_methods: held-out FNMR of cosine and every method
    plots/*.png             DET, quality histograms, EDC, optimal weight vs threshold
    plots/held_out/*.png    DET, quality histograms and EDC of the held-out pairs
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from qmag_ray import metrics, storage
from qmag_ray.calibration.fit import METHODS, fit_pairs
from qmag_ray.calibration.result import QMagFaceCalibration
from qmag_ray.config import to_plain
from qmag_ray.embeddings import load_embeddings
from qmag_ray.errors import WorkflowError
from qmag_ray.pairs.scoring import pair_arrays, shuffled_for_folds
from qmag_ray.pairs.settings import Pooling
from qmag_ray.pairs.sides import PairSide, Sides, build_sides, templates_table
from qmag_ray.quality.columns import with_chosen_quality
from qmag_ray.validation import (
    HeldOutComparison,
    MethodComparison,
    Validation,
    held_out_comparison,
    method_comparison,
    not_evaluated,
)
from qmag_ray.workflows import reporting
from qmag_ray.workflows.config import CalibrateConfig, PairMode
from qmag_ray.workflows.provenance import check_embedding_input, embedding_provenance

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class CalibrationOutcome:
    """What a calibration produced: the calibration, the files written, reports and notes."""

    calibration: QMagFaceCalibration
    output: str
    files: dict[str, str]
    in_sample: dict[str, Any]
    held_out: dict[str, Any] | None
    validation: Validation
    params: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    fit_identities: frozenset[str] = frozenset()
    held_out_identities: frozenset[str] = frozenset()

    @property
    def guard_passed(self) -> bool | None:
        """True/False: the held-out guard's verdict; None: not evaluated."""
        return self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``metrics.json`` holds, with the output, files, params and notes."""
        cal = self.calibration
        return {
            "calibration": {"alpha": cal.alpha, "beta": cal.beta, "method": cal.method},
            "in_sample": self.in_sample,
            "held_out": self.held_out,
            "validation": self.validation.to_dict(),
            "output": storage.redact(self.output),
            "files": {k: storage.redact(v) for k, v in self.files.items()},
            "params": self.params,
            "notes": list(self.notes),
        }

    def tracking_metrics(self) -> dict[str, float]:
        """Flat numeric metrics for MLflow: alpha, beta, counts, in-sample and held-out."""
        cal = self.calibration
        out = {
            "alpha": cal.alpha,
            "beta": cal.beta,
            "n_genuine": float(cal.n_genuine),
            "n_impostor": float(cal.n_impostor),
            **reporting.flat_metrics(self.in_sample, "in_sample"),
            **self.validation.tracking_metrics(),
        }
        if self.held_out is not None:
            out.update(reporting.flat_metrics(self.held_out, "held_out"))
        return out

    def summary(self) -> str:
        """The console report: parameters, in-sample table, held-out table and guard, notes."""
        cal = self.calibration
        lines = [
            f"alpha = {cal.alpha:.6f}   beta = {cal.beta:.6f}   (method {cal.method}, "
            f"{cal.n_genuine} genuine / {cal.n_impostor} impostor calibration pairs)",
            "",
            "in-sample (a generated sample of the calibration identities):"
            if "exhaustive_metrics" in self.params
            else "in-sample (the calibration pairs):",
            metrics.format_table(self.in_sample),
            "",
            self.validation.table(),
        ]
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        lines += ["", f"results in {storage.redact(self.output)}"]
        return "\n".join(lines)


def _shards(cfg: CalibrateConfig, use_ray: bool) -> int:
    if cfg.shards:
        return cfg.shards
    if not use_ray:
        return 1
    import ray

    return max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))


def _fit(
    side: PairSide, cfg: CalibrateConfig, use_ray: bool, method: str | None = None
) -> QMagFaceCalibration:
    method = method or cfg.method
    if method not in METHODS:
        raise WorkflowError(
            f"unknown calibration method {method!r}; available: {', '.join(METHODS)}"
        )
    executor = None
    if use_ray:
        from qmag_ray.calibration.distributed import RayExecutor

        executor = RayExecutor(side.source)
    return fit_pairs(side.source, cfg.grid, executor=executor, method=method, direct=cfg.direct)


def _metric_arrays(side: PairSide, cfg: CalibrateConfig, use_ray: bool):
    arrays = pair_arrays(side.listed, use_ray=use_ray)
    if side.info.get("pairs") != "listed":  # generated (or a generated sample): genuine first
        arrays = shuffled_for_folds(arrays, cfg.generate.seed)
    return arrays


@dataclass(frozen=True, eq=False)
class _Validated:
    """The held-out comparison (None without a held-out side), its side description and the
    figures and arrays the report files need."""

    comparison: HeldOutComparison | None
    fields: dict[str, Any]
    report: dict[str, Any] | None = None
    arrays: tuple | None = None


def _validate(
    sides: Sides, cal: QMagFaceCalibration, cfg: CalibrateConfig, use_ray: bool
) -> _Validated:
    """The held-out comparison and report (or why there is none)."""
    fields: dict[str, Any] = {
        "mode": sides.validation_mode.value,
        "fit_side": sides.fit.info,
        "n_identities_fit": len(sides.fit.identities),
    }
    held = sides.held_out
    if held is None:
        reason = next((n for n in sides.notes if "validation" in n), "no held-out side")
        return _Validated(None, {**fields, "guard": not_evaluated(reason)})
    genuine, impostor = held.listed.counts()
    if not genuine or not impostor:
        raise WorkflowError(
            f"the held-out side has {genuine} genuine and {impostor} impostor pairs; it needs "
            "both (change validation.fraction/seed or give a validation pair list)"
        )
    logger.info("held-out validation on %d genuine / %d impostor pairs", genuine, impostor)
    arrays = _metric_arrays(held, cfg, use_ray)
    comparison = held_out_comparison(
        *arrays,
        cal,
        tolerance=cfg.validation.tolerance,
        abs_tolerance=cfg.validation.abs_tolerance,
        min_false_matches=cfg.validation.min_false_matches,
    )
    fields.update(
        guard=comparison.guard,
        held_out_side=held.info,
        n_identities_held_out=len(held.identities),
        identity_disjoint=not (sides.fit.identities & held.identities),
    )
    return _Validated(comparison, fields, reporting.report(*arrays, cal), arrays)


def _compare_methods(
    sides: Sides,
    cal: QMagFaceCalibration,
    cfg: CalibrateConfig,
    use_ray: bool,
    held_arrays: tuple | None,
) -> MethodComparison:
    """Fit every method on the fit side and measure each on the held-out pairs."""
    fits: dict[str, QMagFaceCalibration] = {}
    for method in METHODS:
        if method == cal.method:
            fits[method] = cal
        else:
            logger.info("compare methods: fitting %s on the fit side", method)
            fits[method] = _fit(sides.fit, cfg, use_ray, method)
    comparisons: dict[str, HeldOutComparison] = {}
    if held_arrays is not None:
        v = cfg.validation
        for method, fitted in fits.items():
            comparisons[method] = held_out_comparison(
                *held_arrays,
                fitted,
                tolerance=v.tolerance,
                abs_tolerance=v.abs_tolerance,
                min_false_matches=v.min_false_matches,
            )
    return method_comparison(comparisons, fits, cal.method)


def _params(cfg: CalibrateConfig, sides: Sides, shards: int) -> dict[str, Any]:
    data = to_plain(cfg)
    data.pop("tracking")
    data["pair_mode"] = cfg.resolved_pair_mode.value
    data["shards"] = shards
    data["embeddings_fingerprint"] = sides.table_info["fingerprint"]
    data["embeddings_dim"] = sides.table_info["dim"]
    for key in ("embeddings", "output", "pairs"):
        if data.get(key):
            data[key] = storage.redact(data[key])
    return data


def run_calibration(config: CalibrateConfig, *, use_ray: bool = True) -> CalibrationOutcome:
    """Fit alpha and beta as ``config`` says, validate on held-out pairs, write the results.

    Raises:
        WorkflowError, EmbeddingsError, PairFileError, ResolveError, ValueError: input that
            cannot be used (named in the message): user errors for the entry point.
    """
    cfg = config
    checked = check_embedding_input(cfg.embeddings, allow_incomplete=cfg.allow_incomplete)
    table = load_embeddings(cfg.embeddings)
    table, qinfo = with_chosen_quality(table, cfg.embeddings, cfg.quality)
    table, pooled = templates_table(table, cfg)
    shards = _shards(cfg, use_ray)
    sides = build_sides(table, cfg, shards)
    notes = [n for n in (checked.note, qinfo.note()) if n] + list(sides.notes)
    if pooled is not None:
        sides.table_info["templates"] = {
            "uri": storage.redact(cfg.templates or ""),
            "pooling": Pooling(cfg.pooling).value,
            **pooled.to_dict(),
        }
        if pooled.missing_images:
            notes.append(
                f"{pooled.missing_images} image(s) of the template table are not in the "
                "embeddings and were left out of their templates"
            )
    for note in notes:
        logger.warning("%s", note)
    n_gen, n_imp = sides.fit.source.counts()
    logger.info(
        "calibrating (%s pairs, method %s) on %d genuine / %d impostor pairs in %d shard(s)",
        cfg.resolved_pair_mode.value,
        getattr(cfg.method, "value", cfg.method),
        n_gen,
        n_imp,
        sides.fit.source.num_shards(),
    )
    cal = _fit(sides.fit, cfg, use_ray)
    if cal.extra.get("grid_note"):
        notes.append(cal.extra["grid_note"])
    logger.info("fitted alpha=%.6f beta=%.6f; measuring in-sample metrics", cal.alpha, cal.beta)
    fit_arrays = _metric_arrays(sides.fit, cfg, use_ray)
    in_sample = reporting.report(*fit_arrays, cal)
    validated = _validate(sides, cal, cfg, use_ray)
    held_report, held_arrays = validated.report, validated.arrays
    methods = None
    if cfg.compare_methods:
        methods = _compare_methods(sides, cal, cfg, use_ray, held_arrays)
        if held_arrays is None:
            notes.append("compare_methods: no held-out side, so the methods are only fitted")
    validation = Validation(
        **validated.fields, comparison=validated.comparison, methods=methods, notes=tuple(notes)
    )
    provenance = {**embedding_provenance(cfg.embeddings), **checked.to_dict()}
    cal = dataclasses.replace(
        cal,
        extra={
            **cal.extra,
            "embedding_dim": table.dim,
            "quality_column": cfg.quality.column,
            "quality": qinfo.to_dict(),
            "embeddings": {**sides.table_info, **provenance},
            "pairs": sides.fit.info,
            "validation": validation.to_dict(),
        },
    )
    files = _write(cfg.output, cal, in_sample, held_report, validation, fit_arrays, held_arrays)
    params = _params(cfg, sides, shards)
    params["embedding_model"] = provenance
    params["quality_column"] = cfg.quality.column
    params["quality_file"] = storage.redact(cfg.quality.file) if cfg.quality.file else None
    if cfg.resolved_pair_mode is PairMode.EXHAUSTIVE:
        params["exhaustive_metrics"] = "sample of generated pairs"
    return CalibrationOutcome(
        calibration=cal,
        output=cfg.output,
        files=files,
        in_sample=in_sample,
        held_out=held_report,
        validation=validation,
        params=params,
        notes=notes,
        fit_identities=sides.fit.identities,
        held_out_identities=frozenset() if sides.held_out is None else sides.held_out.identities,
    )


def _write(
    output: str,
    cal: QMagFaceCalibration,
    in_sample: dict[str, Any],
    held_report: dict[str, Any] | None,
    validation: Validation,
    fit_arrays: tuple,
    held_arrays: tuple | None,
) -> dict[str, str]:
    """Every result file under ``output``; returns {name: URI} (plots as ``plots/<file>``)."""
    import pandas as pd

    from qmag_ray.tracking.runs import grid_table

    files = {"calibration.json": storage.join(output, "calibration.json")}
    cal.save(files["calibration.json"])
    metrics_doc = {
        "calibration": {"alpha": cal.alpha, "beta": cal.beta, "method": cal.method},
        "in_sample": in_sample,
        "held_out": held_report,
        "validation": validation.to_dict(),
    }
    files["metrics.json"] = reporting.write_json(storage.join(output, "metrics.json"), metrics_doc)
    files["grid_table.csv"] = reporting.write_csv(
        storage.join(output, "grid_table.csv"), grid_table(cal)
    )
    if validation.rows:
        files["held_out.csv"] = reporting.write_csv(
            storage.join(output, "held_out.csv"),
            pd.DataFrame([r.to_dict() for r in validation.rows]),
        )
    if validation.methods is not None and validation.methods.rows:
        files["held_out_methods.csv"] = reporting.write_csv(
            storage.join(output, "held_out_methods.csv"),
            pd.DataFrame(validation.methods.to_dict()["rows"]),
        )
    plots_dir = storage.join(output, "plots")
    written = reporting.write_figures(
        plots_dir, *fit_arrays, cal, in_sample, with_calibration_plot=True, subset="in-sample"
    )
    if held_arrays is not None:
        written += reporting.write_figures(
            storage.join(plots_dir, "held_out"),
            *held_arrays,
            cal,
            held_report,
            with_calibration_plot=False,
            subset="held-out",
        )
    for uri in written:
        files[storage.join("plots", _relative(plots_dir, uri))] = uri
    logger.info("wrote %d result files to %s", len(files), storage.redact(output))
    return files


def _relative(folder: str, uri: str) -> str:
    return uri[len(folder.rstrip("/")) + 1 :]
