"""Figures a person wants after calibration and evaluation, written as PNG to any URI.

matplotlib is imported inside the functions (nothing happens at import) and used through
``Figure`` objects with the Agg renderer, never pyplot's global state, so plotting is safe in
services and threads. Every function returns the URI it wrote.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from qmag_ray import storage

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from qmag_ray.calibration.result import QMagFaceCalibration


def _figure(width: float = 6.0, height: float = 4.5) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, uri: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def det_curves(uri: str, scores: Mapping[str, np.ndarray], labels: np.ndarray) -> str:
    """DET curves (FNMR against FMR, log-log) of several scores on the same pairs."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).ravel()
    fig = _figure()
    ax = fig.add_subplot()
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(y, np.asarray(s, np.float64).ravel())
        fnr = 1.0 - tpr
        ok = (fpr > 0) & (fnr > 0)
        ax.plot(fpr[ok], fnr[ok], label=name, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false match rate (FMR)")
    ax.set_ylabel("false non-match rate (FNMR)")
    ax.set_title(f"DET: {int(y.sum())} genuine / {int((y == 0).sum())} impostor pairs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, uri)


def weight_threshold(uri: str, calibration: QMagFaceCalibration) -> str:
    """Optimal quality weight against its threshold per FMR, with the fitted line (the paper's
    figure): ``w_opt = beta * t_opt - alpha``."""
    t = np.asarray(calibration.optimal_thresholds)
    w = np.asarray(calibration.optimal_weights)
    fig = _figure()
    ax = fig.add_subplot()
    points = ax.scatter(t, w, c=np.log10(calibration.fmrs), cmap="viridis", s=22)
    fig.colorbar(points, ax=ax, label="log10 FMR")
    line_t = np.linspace(t.min(), t.max(), 100)
    ax.plot(
        line_t,
        calibration.beta * line_t - calibration.alpha,
        color="crimson",
        label=f"w = {calibration.beta:.4f} t - {calibration.alpha:.4f}",
    )
    ax.set_xlabel("threshold t (sigmoid space)")
    ax.set_ylabel("optimal quality weight w")
    ax.set_title("Optimal quality weight per FMR")
    ax.legend()
    return _save(fig, uri)


def quality_histograms(uri: str, quality: np.ndarray, labels: np.ndarray, bins: int = 60) -> str:
    """Pair-quality distributions of genuine and impostor pairs (densities)."""
    q = np.asarray(quality, np.float64).ravel()
    y = np.asarray(labels).ravel()
    fig = _figure()
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(q, bins=bins)
    for value, name in ((1, "genuine"), (0, "impostor")):
        part = q[y == value]
        if len(part):
            ax.hist(part, bins=edges, density=True, alpha=0.5, label=f"{name} ({len(part)})")
    ax.set_xlabel("pair quality min(||e_a||, ||e_b||)")
    ax.set_ylabel("density")
    ax.set_title("Pair quality")
    ax.legend()
    return _save(fig, uri)


def edc(uri: str, curves: Mapping[str, dict[str, Any]]) -> str:
    """Error-versus-discard curves (``metrics.error_versus_discard`` outputs, by score name)."""
    fig = _figure()
    ax = fig.add_subplot()
    fmr = None
    for i, (name, c) in enumerate(curves.items()):
        fmr = c["fmr"]
        x = 100.0 * np.asarray(c["discard"])
        for key, style in (("fnmr_rederived", "-"), ("fnmr_fixed_threshold", "--")):
            y = np.array([np.nan if v is None else 100.0 * v for v in c[key]])
            tag = "threshold re-derived" if style == "-" else "fixed threshold"
            ax.plot(x, y, style, color=f"C{i}", marker=".", label=f"{name}, {tag}")
    ax.set_xlabel("pairs discarded, lowest quality first (%)")
    ax.set_ylabel(f"FNMR at FMR {fmr:g} (%)" if fmr is not None else "FNMR (%)")
    ax.set_title("Error versus discard")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, uri)


def write_plots(
    output_uri: str,
    *,
    labels: np.ndarray,
    quality: np.ndarray,
    scores: Mapping[str, np.ndarray],
    report: Mapping[str, Any] | None = None,
    calibration: QMagFaceCalibration | None = None,
) -> list[str]:
    """All applicable figures into ``output_uri`` (a directory URI); returns their URIs."""
    written = [
        det_curves(storage.join(output_uri, "det.png"), scores, labels),
        quality_histograms(storage.join(output_uri, "quality_histograms.png"), quality, labels),
    ]
    if calibration is not None and calibration.optimal_thresholds:
        written.append(
            weight_threshold(storage.join(output_uri, "weight_threshold.png"), calibration)
        )
    if report is not None:
        curves = {name: m["edc"] for name, m in report["scores"].items()}
        written.append(edc(storage.join(output_uri, "edc.png"), curves))
    return written
