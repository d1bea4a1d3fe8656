"""Confidence intervals for FNMR@FMR and EER by bootstrap over identities, and d'.

The sampling unit is the identity, which keeps the pairs of one person together (pairs of
one person are not independent). A replicate draws as many identities as there are, with
replacement; an identity drawn ``m`` times weighs ``m`` in every pair it takes part in, so a
genuine pair of identity ``i`` weighs ``m_i`` and an impostor pair of ``i`` and ``j`` weighs
``m_i * m_j`` (pairs of identities not drawn weigh 0). FNMR@FMR follows ISO/IEC 19795-1 on
the weighted scores (lowest FNMR among thresholds with FMR <= f, match iff score >= t); EER
interpolates the weighted ROC as ``metrics.eer`` does. The interval is the percentile interval
of the replicates (95 %: the 2.5th and 97.5th percentiles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmag_ray.calibration.result import fmr_key


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval (None where unmeasurable)."""

    value: float | None
    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def format_pct(self, digits: int = 3) -> str:
        if self.value is None:
            return "-"
        if self.low is None or self.high is None:
            return f"{100 * self.value:.{digits}f}"
        return (
            f"{100 * self.value:.{digits}f} [{100 * self.low:.{digits}f}, "
            f"{100 * self.high:.{digits}f}]"
        )


@dataclass(frozen=True)
class BootstrapReport:
    """FNMR@FMR and EER with intervals for one score, plus the replicate settings."""

    fnmr_at_fmr: dict[str, Interval]
    eer: Interval
    replicates: int
    level: float
    unit: str
    n_units: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fnmr_at_fmr": {k: v.to_dict() for k, v in self.fnmr_at_fmr.items()},
            "eer": self.eer.to_dict(),
            "replicates": self.replicates,
            "level": self.level,
            "unit": self.unit,
            "n_units": self.n_units,
            "notes": list(self.notes),
        }


class _WeightedRoc:
    """Scores sorted once (highest first) with tie groups, for ROCs under many weightings."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray) -> None:
        s = np.asarray(scores, np.float64)
        order = np.argsort(-s, kind="stable")
        self.order = order
        self.genuine = np.asarray(labels)[order].astype(bool)
        sorted_s = s[order]
        # last index of each run of equal scores: thresholds are the distinct score values
        self.ends = np.flatnonzero(np.r_[sorted_s[1:] != sorted_s[:-1], True])

    def rates(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        """FMR and FNMR at every distinct threshold (plus 'accept nothing' first)."""
        w = weight[self.order]
        wg = np.where(self.genuine, w, 0.0)
        wi = w - wg
        tg, ti = float(wg.sum()), float(wi.sum())
        tp = np.cumsum(wg)[self.ends]
        fp = np.cumsum(wi)[self.ends]
        fmr = np.r_[0.0, fp / ti] if ti > 0 else np.r_[0.0, fp * np.nan]
        fnmr = np.r_[1.0, 1.0 - tp / tg] if tg > 0 else np.r_[1.0, tp * np.nan]
        return fmr, fnmr, tg, ti


def _fnmr_at(fmr: np.ndarray, fnmr: np.ndarray, targets: np.ndarray) -> np.ndarray:
    # FMR grows along the thresholds: the last threshold with FMR <= f has the lowest FNMR
    j = np.searchsorted(fmr, targets * (1 + 1e-12), side="right") - 1
    return fnmr[np.maximum(j, 0)]


def _eer(fmr: np.ndarray, fnmr: np.ndarray) -> float:
    i = int(np.argmax(fnmr <= fmr))
    if i == 0:
        return float(fmr[0])
    d0, d1 = fnmr[i - 1] - fmr[i - 1], fnmr[i] - fmr[i]
    t = d0 / (d0 - d1) if d0 != d1 else 0.0
    return float(fmr[i - 1] + t * (fmr[i] - fmr[i - 1]))


def weighted_fnmr_eer(
    scores: np.ndarray, labels: np.ndarray, weight: np.ndarray, fmrs: np.ndarray
) -> tuple[np.ndarray, float]:
    """FNMR at each FMR and the EER of weighted pairs (weights 1: the plain metrics)."""
    roc = _WeightedRoc(scores, labels)
    fmr, fnmr, _, _ = roc.rates(np.asarray(weight, np.float64))
    return _fnmr_at(fmr, fnmr, np.asarray(fmrs, np.float64)), _eer(fmr, fnmr)


def _units(
    labels: np.ndarray, id_a: np.ndarray | None, id_b: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Integer unit codes of both sides of every pair (identities, else the pair itself)."""
    n = len(labels)
    if id_a is None or id_b is None or any(x is None for x in id_a) or any(x is None for x in id_b):
        codes = np.arange(n)
        return codes, codes, n, "pair"
    names, inverse = np.unique(
        np.concatenate([np.asarray(id_a, str), np.asarray(id_b, str)]), return_inverse=True
    )
    return inverse[:n], inverse[n:], len(names), "identity"


def identity_bootstrap(
    scores: np.ndarray,
    labels: np.ndarray,
    id_a: np.ndarray | None,
    id_b: np.ndarray | None,
    fmrs: tuple[float, ...] | np.ndarray,
    *,
    replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapReport:
    """Percentile intervals of FNMR@FMR and EER over identity bootstrap replicates.

    Without identities for every pair the unit falls back to the pair (said in ``notes``).
    FMRs the data cannot measure (FMR x impostors < 1) get no value.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(np.int8)
    fmrs = np.asarray(fmrs, np.float64)
    ua, ub, n_units, unit = _units(y, id_a, id_b)
    notes = [] if unit == "identity" else ["no identities: pairs resampled as units"]
    roc = _WeightedRoc(s, y)
    fmr, fnmr, _, n_imp = roc.rates(np.ones(len(s)))
    point = _fnmr_at(fmr, fnmr, fmrs)
    point_eer = _eer(fmr, fnmr)
    ok = fmrs * n_imp >= 1 - 1e-9
    rng = np.random.default_rng(seed)
    genuine = y == 1
    boot_f = np.full((replicates, len(fmrs)), np.nan)
    boot_e = np.full(replicates, np.nan)
    for b in range(replicates):
        m = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units).astype(np.float64)
        w = np.where(genuine, m[ua], m[ua] * m[ub]) if unit == "identity" else m[ua]
        bf, bn, tg, ti = roc.rates(w)
        if tg > 0 and ti > 0:
            boot_f[b] = _fnmr_at(bf, bn, fmrs)
            boot_e[b] = _eer(bf, bn)
    alpha = (1 - level) / 2
    out = {}
    for k, f in enumerate(fmrs):
        if not ok[k]:
            continue
        col = boot_f[:, k][np.isfinite(boot_f[:, k])]
        lo, hi = np.quantile(col, [alpha, 1 - alpha]) if len(col) else (math.nan, math.nan)
        out[fmr_key(float(f))] = Interval(float(point[k]), _opt(lo), _opt(hi))
    e = boot_e[np.isfinite(boot_e)]
    elo, ehi = np.quantile(e, [alpha, 1 - alpha]) if len(e) else (math.nan, math.nan)
    return BootstrapReport(
        out, Interval(point_eer, _opt(elo), _opt(ehi)), replicates, level, unit, n_units, notes
    )


def _opt(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def distribution_stats(scores: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Genuine and impostor mean and (population) standard deviation, and the decidability
    ``d' = |mu_g - mu_i| / sqrt((sd_g^2 + sd_i^2) / 2)``."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    g, i = s[y], s[~y]
    if len(g) == 0 or len(i) == 0:
        return {
            "genuine_mean": None,
            "genuine_std": None,
            "impostor_mean": None,
            "impostor_std": None,
            "d_prime": None,
        }
    mg, mi, sg, si = float(g.mean()), float(i.mean()), float(g.std()), float(i.std())
    spread = math.sqrt((sg**2 + si**2) / 2)
    return {
        "genuine_mean": mg,
        "genuine_std": sg,
        "impostor_mean": mi,
        "impostor_std": si,
        "d_prime": abs(mg - mi) / spread if spread > 0 else None,
    }
