"""FMR primitives shared by metrics, calibration, the guard and the gate (plain numpy).

- ``fmr_key``: the text key of an FMR in JSON maps and metric names (``1e-03``);
- ``measurable``/``supported_fmrs``: whether ``N`` impostor pairs can measure an FMR ``f``, i.e.
  allow at least ``min_false_matches`` false matches (``f * N``; 1 = at all);
- ``allowed_excess``: the tolerance rule of the held-out guard and the promotion gate, the
  larger of an absolute and a relative allowance;
- operating points (ISO/IEC 19795-1, spec section 4): ``impostor_counts`` (how many impostors a
  threshold may pass at FMR ``f``), ``thresholds_at_bounds`` and ``operating_points`` (the
  best threshold and accepted genuine count per FMR).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: FMRs at which a calibration records operating thresholds of the QMagFace score.
OPERATING_FMRS = (1e-2, 1e-3, 1e-4, 1e-5)
#: FMRs of the verification reports.
REPORT_FMRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
_EPS = 1e-9


def fmr_key(fmr: float) -> str:
    """Canonical text key of an FMR value in JSON maps (``1e-03``)."""
    return f"{fmr:.0e}"


def false_matches(fmr: float, n_impostor: int) -> float:
    """How many false matches FMR ``fmr`` allows among ``n_impostor`` impostor pairs."""
    return float(fmr) * int(n_impostor)


def measurable(fmr: float, n_impostor: int, min_false_matches: int = 1) -> bool:
    """Whether ``n_impostor`` pairs measure ``fmr``: it allows >= ``min_false_matches``."""
    return false_matches(fmr, n_impostor) >= min_false_matches - _EPS


def supported_fmrs(
    fmrs: Iterable[float], n_impostor: int, min_false_matches: int = 1
) -> list[float]:
    """The FMRs of ``fmrs`` that ``n_impostor`` impostor pairs measure (``measurable``)."""
    return [f for f in fmrs if measurable(f, n_impostor, min_false_matches)]


def allowed_excess(reference: float, absolute: float, relative: float) -> float:
    """How much worse than ``reference`` a value may be: ``max(absolute, relative * ref)``
    (the guard: QMagFace FNMR vs cosine; the gate: challenger FNMR vs champion)."""
    return max(float(absolute), float(relative) * float(reference))


def impostor_counts(n_impostor: int, fmrs: np.ndarray, *, strict: bool) -> np.ndarray:
    """Per FMR ``f``, the most impostors ``m`` a threshold may pass: the largest ``m`` in
    ``0..N`` whose rate ``m / N`` (as a ROC curve computes it) is below ``f`` (``strict``) or
    at most ``f``. Float comparisons exactly as ``searchsorted`` on the rates would make."""
    if n_impostor <= 0:
        raise ValueError("operating points need at least one impostor score")
    fmrs = np.atleast_1d(np.asarray(fmrs, np.float64))
    n = float(n_impostor)
    m = np.clip(np.floor(fmrs * n).astype(np.int64), 0, n_impostor)

    def ok(c: np.ndarray) -> np.ndarray:
        rate = c.astype(np.float64) / n
        return rate < fmrs if strict else rate <= fmrs

    for _ in range(4):  # floor(f * N) is within one of the answer; settle it exactly
        m = np.where((m > 0) & ~ok(m), m - 1, m)
        m = np.where((m < n_impostor) & ok(np.minimum(m + 1, n_impostor)), m + 1, m)
    return m


def thresholds_at_bounds(
    genuine: np.ndarray, bound: np.ndarray, top: float
) -> tuple[np.ndarray, np.ndarray]:
    """Best threshold and number of accepted genuine pairs for impostor bounds (match iff
    score >= t).

    A threshold ``t`` passes at most ``m`` impostors iff ``t > bound``, the ``(m + 1)``-th
    highest impostor score. Among the thresholds with the lowest FNMR the highest is returned:
    the smallest genuine score above the bound. When no genuine score can be accepted it is the
    highest impostor score ``top`` if that is above the bound, else NaN (no admissible value).
    """
    genuine = np.asarray(genuine, np.float64)
    bound = np.asarray(bound, np.float64)
    # Only genuine scores between the lowest and highest bound need sorting; the ones above
    # are accepted at every FMR, the ones at or below the lowest bound nowhere.
    lo, hi = bound.min(), bound.max()
    high = genuine > hi
    n_high = int(high.sum())
    min_high = genuine[high].min() if n_high else np.nan
    mid = np.sort(genuine[(genuine > lo) & ~high])
    first = np.searchsorted(mid, bound, side="right")
    accepted = (len(mid) - first + n_high).astype(np.int64)
    fallback = np.where(top > bound, top, np.nan)
    above = np.where(n_high, min_high, fallback)
    if len(mid):
        thresholds = np.where(first < len(mid), mid[np.minimum(first, len(mid) - 1)], above)
    else:
        thresholds = above
    return thresholds.astype(np.float64), accepted


def operating_points(
    genuine: np.ndarray,
    impostor_desc: np.ndarray,
    n_impostor: int,
    fmrs: np.ndarray,
    *,
    strict: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Best threshold and accepted genuine count per FMR from ALL impostor scores, sorted in
    decreasing order (in-memory metrics). ``strict``: FMR < f (calibration, spec 3) or
    FMR <= f (ISO/IEC 19795-1, spec 4)."""
    impostor_desc = np.asarray(impostor_desc, np.float64)
    if len(impostor_desc) != n_impostor:
        raise ValueError(f"need all {n_impostor} impostor scores, got {len(impostor_desc)}")
    m = impostor_counts(n_impostor, fmrs, strict=strict)
    bound = np.where(m < n_impostor, impostor_desc[np.minimum(m, n_impostor - 1)], -np.inf)
    return thresholds_at_bounds(genuine, bound, float(impostor_desc[0]))
