"""Differential performance across groups (in the spirit of ISO/IEC 19795-10).

A group column gives each image a group (demographic or not: pose band, age band, capture
device). A pair belongs to group ``g`` when both of its images do; pairs across groups are
counted as ``mixed`` and left out of the per-group rates. For every system the operating
threshold is fixed once on all pairs (FMR ``f``, ISO/IEC 19795-1), then each group's FNMR
(genuine pairs) and FMR (impostor pairs) are measured at that global threshold, and the
differential is the ratio of the largest to the smallest group rate (None where the smallest
is 0 or a group has no pairs of that kind). Each group's image-quality distribution is
reported beside it: quality estimates inherit the recogniser's biases (SER-FIQ's second half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmag_ray import metrics


@dataclass(frozen=True)
class GroupReport:
    """Per-group rates of each system at its global threshold, plus quality distributions."""

    column: str
    fmr: float
    groups: list[str]
    thresholds: dict[str, float]
    rows: list[dict[str, Any]]
    ratios: dict[str, dict[str, float | None]]
    quality: dict[str, dict[str, float]]
    quality_measure: str
    mixed_pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "fmr": self.fmr,
            "groups": self.groups,
            "thresholds": self.thresholds,
            "rows": self.rows,
            "max_min_ratio": self.ratios,
            "quality": self.quality,
            "quality_measure": self.quality_measure,
            "mixed_pairs": self.mixed_pairs,
        }

    def format_table(self) -> str:
        systems = list(self.thresholds)
        head = f"per-{self.column} report at the global threshold for FMR {self.fmr:g}"
        cols = "".join(f" {s + ' FNMR%':>15} {s + ' FMR%':>15}" for s in systems)
        lines = [head, f"{'group':<12} {'genuine':>8} {'impostor':>9} {'median q':>9}{cols}"]
        for row in self.rows:
            cells = ""
            for s in systems:
                cells += f" {_pct(row[s]['fnmr']):>15} {_pct(row[s]['fmr']):>15}"
            q = self.quality.get(row["group"], {}).get("median")
            qs = "-" if q is None else f"{q:.4g}"
            lines.append(
                f"{row['group']:<12} {row['n_genuine']:>8} {row['n_impostor']:>9} {qs:>9}{cells}"
            )
        ratio = ""
        for s in systems:
            r = self.ratios[s]
            ratio += f" {_ratio(r['fnmr']):>15} {_ratio(r['fmr']):>15}"
        lines.append(f"{'max/min':<12} {'':>8} {'':>9} {'':>9}{ratio}")
        if self.mixed_pairs:
            lines.append(f"({self.mixed_pairs} pairs across groups are not in any row)")
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _quantiles(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {}
    q = np.quantile(v, [0.25, 0.5, 0.75])
    return {
        "n": float(len(v)),
        "mean": float(v.mean()),
        "q25": float(q[0]),
        "median": float(q[1]),
        "q75": float(q[2]),
    }


def group_report(
    column: str,
    group_a: np.ndarray,
    group_b: np.ndarray,
    labels: np.ndarray,
    scores: dict[str, np.ndarray],
    image_groups: np.ndarray,
    image_quality: np.ndarray,
    *,
    fmr: float = 1e-3,
    quality_measure: str = "quality",
) -> GroupReport:
    """The report for one group column (see the module docstring).

    ``group_a``/``group_b``: each pair's two image groups (None: unknown, a mixed pair);
    ``image_groups``/``image_quality``: every image's group and quality (distributions).
    """
    y = np.asarray(labels).astype(bool)
    ga = np.asarray([None if g is None else str(g) for g in group_a], dtype=object)
    gb = np.asarray([None if g is None else str(g) for g in group_b], dtype=object)
    same = np.array([a is not None and a == b for a, b in zip(ga, gb, strict=True)], bool)
    names = sorted({str(g) for g in image_groups if g is not None})
    thresholds, rows = {}, []
    for s_name, s in scores.items():
        t = float(metrics.operating_thresholds(s, y.astype(np.int8), [fmr])[1][0])
        if not math.isfinite(t):
            raise ValueError(f"FMR {fmr:g} cannot be measured on these impostor pairs")
        thresholds[s_name] = t
    for g in names:
        in_g = same & (ga == g)
        row: dict[str, Any] = {
            "group": g,
            "n_genuine": int((in_g & y).sum()),
            "n_impostor": int((in_g & ~y).sum()),
        }
        for s_name, s in scores.items():
            sg, si = s[in_g & y], s[in_g & ~y]
            t = thresholds[s_name]
            row[s_name] = {
                "fnmr": float(np.mean(sg < t)) if len(sg) else None,
                "fmr": float(np.mean(si >= t)) if len(si) else None,
            }
        rows.append(row)
    ratios = {}
    for s_name in scores:
        ratios[s_name] = {}
        for rate in ("fnmr", "fmr"):
            vals = [r[s_name][rate] for r in rows]
            if not vals or any(v is None for v in vals) or min(vals) == 0:
                ratios[s_name][rate] = None
            else:
                ratios[s_name][rate] = max(vals) / min(vals)
    img_g = np.asarray([None if g is None else str(g) for g in image_groups], dtype=object)
    quality = {g: _quantiles(np.asarray(image_quality)[img_g == g]) for g in names}
    return GroupReport(
        column, fmr, names, thresholds, rows, ratios, quality, quality_measure, int((~same).sum())
    )
