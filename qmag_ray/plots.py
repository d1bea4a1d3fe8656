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


#: DET axis ticks (rates) on normal-deviate axes, as bob and scikit-learn's DetCurveDisplay.
DET_TICKS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8, 0.95)


def _tick_label(rate: float) -> str:
    pct = 100.0 * rate
    return f"{pct:g}%" if pct >= 0.01 else f"{pct:.0e}%"


def det_curves(
    uri: str,
    scores: Mapping[str, np.ndarray],
    labels: np.ndarray | Mapping[str, np.ndarray],
    intervals: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
) -> str:
    """DET curves (FNMR against FMR) on normal-deviate axes (probit of both rates).

    ``labels`` is one array for all scores, or one per score name (systems compared on
    different pairs). ``intervals`` (optional, by score name) holds bootstrap reports
    (``BootstrapReport.to_dict()``): FNMR@FMR intervals are drawn as error bars and the EER
    interval is stated in the legend.
    """
    from scipy.stats import norm
    from sklearn.metrics import roc_curve

    fig = _figure()
    ax = fig.add_subplot()
    lo_rate, counts = 1.0, []
    for i, (name, s) in enumerate(scores.items()):
        y = np.asarray(labels[name] if isinstance(labels, Mapping) else labels).ravel()
        counts.append((int(y.sum()), int((y == 0).sum())))
        fpr, tpr, _ = roc_curve(y, np.asarray(s, np.float64).ravel())
        fnr = 1.0 - tpr
        ok = (fpr > 0) & (fnr > 0)
        lo_rate = min(lo_rate, 1.0 / max(1, int((y == 0).sum())))
        label = name
        boot = (intervals or {}).get(name)
        if boot:
            e = boot["eer"]
            if e.get("low") is not None:
                label += (
                    f" (EER {100 * e['value']:.2f}% [{100 * e['low']:.2f}, {100 * e['high']:.2f}])"
                )
        ax.plot(
            norm.ppf(fpr[ok]), norm.ppf(fnr[ok]), color=f"C{i}", label=label, drawstyle="steps-post"
        )
        for key, iv in (boot or {}).get("fnmr_at_fmr", {}).items():
            if iv.get("low") is None or not 0 < iv["value"] < 1:
                continue
            x = norm.ppf(float(key))
            lo = norm.ppf(min(max(iv["low"], 1e-9), 1 - 1e-9))
            hi = norm.ppf(min(max(iv["high"], 1e-9), 1 - 1e-9))
            yv = norm.ppf(iv["value"])
            ax.errorbar(
                [x], [yv], yerr=[[yv - lo], [hi - yv]], color=f"C{i}", fmt="o", ms=3, capsize=3
            )
    ticks = [t for t in DET_TICKS if t >= lo_rate / 2]
    ax.set_xticks(norm.ppf(ticks), [_tick_label(t) for t in ticks], fontsize="small")
    ax.set_yticks(norm.ppf(DET_TICKS), [_tick_label(t) for t in DET_TICKS], fontsize="small")
    ax.set_xlim(norm.ppf(max(lo_rate / 2, 1e-7)), norm.ppf(0.6))
    ax.set_ylim(norm.ppf(1e-4), norm.ppf(0.95))
    ax.set_xlabel("false match rate (FMR), normal-deviate scale")
    ax.set_ylabel("false non-match rate (FNMR), normal-deviate scale")
    if title is None:
        g, i_ = counts[0] if counts else (0, 0)
        same = all(c == counts[0] for c in counts)
        title = f"DET: {g} genuine / {i_} impostor pairs" if same else "DET"
        if intervals:
            title += " (bars: 95% identity-bootstrap intervals)"
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
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


def _counts_text(labels: np.ndarray, subset: str) -> str:
    """``held-out, 9000 genuine / 90000 impostor pairs`` (what a figure shows)."""
    y = np.asarray(labels).ravel()
    counts = f"{int((y == 1).sum())} genuine / {int((y == 0).sum())} impostor pairs"
    return f"{subset}, {counts}" if subset else counts


#: An EDC point needs this many false matches at its FMR among the kept impostors.
EDC_MIN_FALSE_MATCHES = 10


def quality_histograms(
    uri: str, quality: np.ndarray, labels: np.ndarray, bins: int = 60, subset: str = ""
) -> str:
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
    ax.set_title(f"Pair quality ({_counts_text(y, subset)})", fontsize="medium")
    ax.legend()
    return _save(fig, uri)


def edc(uri: str, curves: Mapping[str, dict[str, Any]], subset: str = "") -> str:
    """Error-versus-discard curves (``metrics.error_versus_discard`` outputs, by score name).

    A curve stops where fewer than ``EDC_MIN_FALSE_MATCHES`` false matches at its FMR remain
    among the kept impostors (the FNMR there rests on a handful of scores); a note says where.
    """
    fig = _figure()
    ax = fig.add_subplot()
    fmr = None
    stop = None
    counts = ""
    for i, (name, c) in enumerate(curves.items()):
        fmr = c["fmr"]
        x = 100.0 * np.asarray(c["discard"])
        kept = np.asarray(c.get("kept_impostor") or [np.inf] * len(x), np.float64)
        enough = kept * fmr >= EDC_MIN_FALSE_MATCHES - 1e-9
        if not enough.all():
            stop = x[~enough][0] if stop is None else min(stop, x[~enough][0])
        if c.get("kept_genuine") and c.get("kept_impostor"):
            counts = f"{c['kept_genuine'][0]} genuine / {c['kept_impostor'][0]} impostor pairs"
        for key, style in (("fnmr_rederived", "-"), ("fnmr_fixed_threshold", "--")):
            y = np.array([np.nan if v is None else 100.0 * v for v in c[key]])
            y[~enough] = np.nan
            tag = "threshold re-derived" if style == "-" else "fixed threshold"
            ax.plot(x, y, style, color=f"C{i}", marker=".", label=f"{name}, {tag}")
    ax.set_xlabel("pairs discarded, lowest quality first (%)")
    ax.set_ylabel(f"FNMR at FMR {fmr:g} (%)" if fmr is not None else "FNMR (%)")
    head = ", ".join(t for t in (subset, counts) if t)
    ax.set_title(
        f"Error versus discard ({head})" if head else "Error versus discard", fontsize="medium"
    )
    if stop is not None:
        ax.annotate(
            f"stops before {stop:g}% discarded: fewer than {EDC_MIN_FALSE_MATCHES} false "
            f"matches at FMR {fmr:g} remain",
            xy=(0.02, 0.02),
            xycoords="axes fraction",
            fontsize="small",
        )
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
    subset: str = "",
) -> list[str]:
    """All applicable figures into ``output_uri`` (a directory URI); returns their URIs.

    ``subset`` (``in-sample``, ``held-out``...) heads every title, with the pair counts.
    """
    det_title = f"DET ({_counts_text(labels, subset)})" if subset else None
    written = [
        det_curves(storage.join(output_uri, "det.png"), scores, labels, title=det_title),
        quality_histograms(
            storage.join(output_uri, "quality_histograms.png"), quality, labels, subset=subset
        ),
    ]
    if calibration is not None and calibration.optimal_thresholds:
        written.append(
            weight_threshold(storage.join(output_uri, "weight_threshold.png"), calibration)
        )
    if report is not None:
        curves = {name: m["edc"] for name, m in report["scores"].items()}
        written.append(edc(storage.join(output_uri, "edc.png"), curves, subset=subset))
    return written


def quality_edc(uri: str, evaluation: Mapping[str, Any]) -> str:
    """Error versus discard of several quality measures (``QualityEvaluation.to_dict()``):
    FNMR at the fixed threshold (solid) and the re-derived one (dotted) per measure, the
    random-order baseline and the oracle, with each curve's pAUC in the legend."""
    fig = _figure(6.5, 4.8)
    ax = fig.add_subplot()
    curves = list(evaluation["curves"].values())
    lim = evaluation["random"]["pauc_limit"]
    for i, c in enumerate(curves):
        x = 100.0 * np.asarray(c["discard"], np.float64)
        y = 100.0 * np.asarray([np.nan if v is None else v for v in c["fnmr_fixed"]])
        ax.step(
            x, y, where="post", color=f"C{i}", label=f"{c['name']} (pAUC@{lim:.0%} {c['pauc']:.4f})"
        )
        xr = 100.0 * np.asarray(c["rederived_discard"], np.float64)
        yr = 100.0 * np.asarray([np.nan if v is None else v for v in c["fnmr_rederived"]])
        ax.plot(xr, yr, ":", color=f"C{i}", lw=1)
    for c, style in ((evaluation["random"], "--"), (evaluation["oracle"], "-.")):
        x = 100.0 * np.asarray(c["discard"], np.float64)
        y = 100.0 * np.asarray(c["fnmr_fixed"], np.float64)
        ax.step(
            x, y, style, where="post", color="grey", label=f"{c['name']} (pAUC {c['pauc']:.4f})"
        )
    ax.axvline(100 * lim, color="black", lw=0.6, alpha=0.4)
    ax.set_xlabel("genuine pairs discarded, lowest pair quality first (%)")
    ax.set_ylabel(f"FNMR (%) at FMR {evaluation['fmr']:g}")
    ax.set_title(
        f"Error versus discard, {evaluation['n_genuine']} genuine pairs "
        "(solid: threshold fixed before discarding; dotted: re-derived)",
        fontsize="small",
    )
    ax.set_xlim(0, 100 * evaluation["limit"])
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, uri)


def group_quality(uri: str, quality: Mapping[str, np.ndarray], measure: str, column: str) -> str:
    """Image quality distributions per group (one box per group value)."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    names = list(quality)
    ax.boxplot([np.asarray(quality[n], np.float64) for n in names], showfliers=False)
    ax.set_xticks(
        range(1, len(names) + 1), [f"{n}\n({len(quality[n])})" for n in names], fontsize="small"
    )
    ax.set_xlabel(f"group ({column})")
    ax.set_ylabel(f"image quality ({measure})")
    ax.set_title(f"Quality by {column}", fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, uri)


def cmc_curves(uri: str, ranks: Mapping[str, np.ndarray], max_rank: int) -> str:
    """CMC curves: the share of mated searches whose mate is within rank 1..``max_rank``, one
    line per score (``ranks``: 1-based mate rank per mated search, 0 = not in the list)."""
    fig = _figure()
    ax = fig.add_subplot()
    ks = np.arange(1, max_rank + 1)
    n = 0
    for i, (name, r) in enumerate(ranks.items()):
        r = np.asarray(r)
        n = len(r)
        rate = [float(np.mean((r >= 1) & (r <= k))) if len(r) else np.nan for k in ks]
        label = f"{name} (rank-1 {100 * rate[0]:.2f}%)"
        ax.plot(ks, np.multiply(rate, 100), marker="o", ms=3, color=f"C{i}", label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate (%)")
    ax.set_xticks([1, 5, 10, 15, 20] if max_rank >= 20 else list(ks))
    ax.set_title(f"CMC: {n} mated searches", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, uri)


def dir_fpir_curves(
    uri: str,
    mated_top1: Mapping[str, np.ndarray],
    mated_rank1: Mapping[str, np.ndarray],
    nonmated_top1: Mapping[str, np.ndarray],
) -> str:
    """DIR (TPIR) against FPIR, log x axis: at each threshold, the share of non-mated searches
    with a candidate above it and of mated searches whose rank-1 candidate is the mate above
    it; one line per score."""
    fig = _figure()
    ax = fig.add_subplot()
    n_nm = 0
    for i, name in enumerate(mated_top1):
        s = np.asarray(mated_top1[name], np.float64)
        ok = np.asarray(mated_rank1[name], bool)
        nm = np.sort(np.asarray(nonmated_top1[name], np.float64))[::-1]
        n_nm = len(nm)
        fpir = np.arange(1, n_nm + 1) / n_nm
        correct = np.sort(s[ok])
        above = len(correct) - np.searchsorted(correct, nm, side="right")
        dirs = above / max(1, len(s))
        ax.plot(fpir, np.multiply(dirs, 100), color=f"C{i}", label=name, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_xlabel("false positive identification rate (FPIR)")
    ax.set_ylabel("detection and identification rate (%)")
    ax.set_title(f"DIR at FPIR: {n_nm} non-mated searches", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, uri)
