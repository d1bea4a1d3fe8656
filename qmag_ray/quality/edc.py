"""Error-versus-discard (EDC) of several quality measures on the same pairs (ISO/IEC 29794-1).

For each measure the pair quality is the lower of the two faces' qualities. Genuine pairs are
ordered by pair quality; at every distinct genuine pair quality ``v`` (lowest first) the pairs
with quality below ``v`` are discarded, which gives the discard fraction ``r = discarded
genuine / all genuine`` (up to ``limit``). Two FNMR variants per point:

- ``fnmr_fixed``: the threshold is fixed before discarding, at FMR ``f`` on all impostor pairs
  (ISO/IEC 29794-1), and FNMR is measured on the genuine pairs kept;
- ``fnmr_rederived``: genuine and impostor pairs below ``v`` are discarded and the threshold
  is re-derived at FMR ``f`` on the impostors kept (at most ``rederive_points`` cuts).

The curve is a step function (the value at ``r_k`` holds until ``r_(k+1)``); its partial area
``pauc`` is the integral of ``fnmr_fixed`` over ``[0, pauc_limit]``. The random-order baseline
discards pairs regardless of quality: its expected FNMR is the 0 % FNMR at every fraction. The
oracle discards the genuine pairs with the lowest comparison scores first (the best any
quality could do at the fixed threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmag_ray import metrics

DEFAULT_LIMIT = 0.5
DEFAULT_PAUC_LIMIT = 0.2


def step_area(fractions: np.ndarray, values: np.ndarray, limit: float) -> float:
    """Integral over ``[0, limit]`` of the step function that takes ``values[k]`` on
    ``[fractions[k], fractions[k+1])`` (the last value holds up to ``limit``)."""
    r = np.asarray(fractions, np.float64)
    v = np.asarray(values, np.float64)
    if len(r) == 0 or r[0] > 0:
        raise ValueError("a discard curve must start at fraction 0")
    ends = np.append(r[1:], np.inf)
    width = np.clip(np.minimum(ends, limit) - r, 0.0, None)
    return float(np.sum(width * v))


@dataclass(frozen=True)
class EdcCurve:
    """One EDC: discard fractions and FNMR at the fixed and at the re-derived threshold."""

    name: str
    discard: np.ndarray
    fnmr_fixed: np.ndarray
    rederived_discard: np.ndarray
    fnmr_rederived: np.ndarray
    pauc: float
    pauc_limit: float

    def to_dict(self) -> dict[str, Any]:
        def finite(a: np.ndarray) -> list[float | None]:
            return [float(x) if math.isfinite(x) else None for x in np.asarray(a, np.float64)]

        return {
            "name": self.name,
            "discard": finite(self.discard),
            "fnmr_fixed": finite(self.fnmr_fixed),
            "rederived_discard": finite(self.rederived_discard),
            "fnmr_rederived": finite(self.fnmr_rederived),
            "pauc": self.pauc,
            "pauc_limit": self.pauc_limit,
        }

    def at(self, fraction: float) -> float:
        """FNMR (fixed threshold) of the step function at a discard fraction."""
        k = int(np.searchsorted(self.discard, fraction, side="right")) - 1
        return float(self.fnmr_fixed[max(k, 0)])


@dataclass(frozen=True)
class QualityEvaluation:
    """EDCs of several quality measures on the same pairs, with random and oracle curves."""

    fmr: float
    threshold: float
    n_genuine: int
    n_impostor: int
    curves: dict[str, EdcCurve]
    random: EdcCurve
    oracle: EdcCurve
    limit: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fmr": self.fmr,
            "threshold": self.threshold,
            "n_genuine": self.n_genuine,
            "n_impostor": self.n_impostor,
            "limit": self.limit,
            "curves": {k: c.to_dict() for k, c in self.curves.items()},
            "random": self.random.to_dict(),
            "oracle": self.oracle.to_dict(),
            "table": self.table_rows(),
            "notes": list(self.notes),
            "conventions": __doc__.split("\n\n")[1].replace("\n", " "),
        }

    def table_rows(self, points: tuple[float, ...] = (0.05, 0.1, 0.2)) -> list[dict[str, Any]]:
        """One row per measure (then random, oracle): pAUC and FNMR at a few fractions."""
        rows = []
        for c in [*self.curves.values(), self.random, self.oracle]:
            rows.append(
                {
                    "measure": c.name,
                    "pauc": c.pauc,
                    "pauc_vs_random": c.pauc / self.random.pauc if self.random.pauc else None,
                    **{f"fnmr_at_{p:g}": c.at(p) for p in points},
                }
            )
        return rows

    def format_table(self) -> str:
        """The console table: pAUC to ``pauc_limit`` and FNMR % at 0/5/10/20 % discarded."""
        lim = self.random.pauc_limit
        head = (
            f"error versus discard: FNMR at FMR {self.fmr:g} (threshold {self.threshold:.4f} "
            f"fixed before discarding), {self.n_genuine} genuine pairs\n"
            f"{'measure':<16} {'pAUC@' + format(lim, '.0%'):>10} {'vs random':>9} "
            f"{'0%':>8} {'5%':>8} {'10%':>8} {'20%':>8}"
        )
        lines = [head]
        for c in [*self.curves.values(), self.random, self.oracle]:
            ratio = c.pauc / self.random.pauc if self.random.pauc else math.nan
            lines.append(
                f"{c.name:<16} {c.pauc:>10.5f} {ratio:>9.3f} "
                + " ".join(f"{100 * c.at(p):>8.3f}" for p in (0.0, 0.05, 0.1, 0.2))
            )
        return "\n".join(lines)


def _cuts(q_gen: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Distinct genuine pair qualities (ascending) with discard fraction <= limit, and the
    number of genuine pairs below each."""
    values = np.unique(q_gen)
    below = np.searchsorted(np.sort(q_gen), values, side="left")
    keep = below <= limit * len(q_gen) + 1e-9
    return values[keep], below[keep]


def edc_curve(
    name: str,
    scores: np.ndarray,
    labels: np.ndarray,
    pair_quality: np.ndarray,
    threshold: float,
    fmr: float,
    *,
    limit: float = DEFAULT_LIMIT,
    pauc_limit: float = DEFAULT_PAUC_LIMIT,
    rederive_points: int = 40,
) -> EdcCurve:
    """The EDC of one measure (see the module docstring); ``threshold`` is the fixed one."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    q = np.asarray(pair_quality, np.float64)
    if not (len(s) == len(y) == len(q)):
        raise ValueError("scores, labels and pair quality differ in length")
    if not np.isfinite(q).all():
        raise ValueError(f"quality {name!r} has non-finite pair qualities")
    s_gen, q_gen = s[y], q[y]
    n = len(s_gen)
    if n == 0:
        raise ValueError("error versus discard needs genuine pairs")
    values, below = _cuts(q_gen, limit)
    # errors at the fixed threshold, suffix-summed in quality order
    order = np.argsort(q_gen, kind="stable")
    err = (s_gen[order] < threshold).astype(np.int64)
    suffix = np.concatenate([np.cumsum(err[::-1])[::-1], [0]])
    fnmr_fixed = suffix[below] / (n - below)
    discard = below / n
    picks = np.unique(np.linspace(0, len(values) - 1, max(1, rederive_points)).round().astype(int))
    red = np.full(len(picks), np.nan)
    for i, k in enumerate(picks):
        kept = q >= values[k]
        red[i] = metrics.fnmr_at_fmr(s[kept], y[kept].astype(np.int8), [fmr])[0]
    return EdcCurve(
        name,
        discard.astype(np.float64),
        fnmr_fixed.astype(np.float64),
        discard[picks].astype(np.float64),
        red,
        step_area(discard, fnmr_fixed, pauc_limit),
        pauc_limit,
    )


def oracle_curve(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    *,
    limit: float = DEFAULT_LIMIT,
    pauc_limit: float = DEFAULT_PAUC_LIMIT,
) -> EdcCurve:
    """Discarding the lowest-scoring genuine pairs first, one pair at a time."""
    s_gen = np.asarray(scores, np.float64)[np.asarray(labels).astype(bool)]
    n = len(s_gen)
    errors = int(np.sum(s_gen < threshold))
    c = np.arange(0, min(int(math.floor(limit * n + 1e-9)), n - 1) + 1)
    fnmr = np.maximum(errors - c, 0) / (n - c)
    r = c / n
    return EdcCurve("oracle", r, fnmr, r, fnmr, step_area(r, fnmr, pauc_limit), pauc_limit)


def random_curve(
    fnmr0: float, *, limit: float = DEFAULT_LIMIT, pauc_limit: float = DEFAULT_PAUC_LIMIT
) -> EdcCurve:
    """The expected EDC of discarding in random order: the 0 % FNMR at every fraction."""
    r = np.array([0.0, limit])
    v = np.array([fnmr0, fnmr0])
    return EdcCurve("random", r, v, r, v, step_area(r, v, pauc_limit), pauc_limit)


def evaluate_quality(
    scores: np.ndarray,
    labels: np.ndarray,
    measures: dict[str, np.ndarray],
    *,
    fmr: float = 1e-3,
    limit: float = DEFAULT_LIMIT,
    pauc_limit: float = DEFAULT_PAUC_LIMIT,
    rederive_points: int = 40,
) -> QualityEvaluation:
    """EDCs of every measure (pair qualities, one array per measure) on the same pairs.

    ``scores`` are the recogniser's comparison scores (cosine): the curves say how well each
    quality predicts that recogniser's errors.
    """
    if not 0 < pauc_limit <= limit <= 1:
        raise ValueError(f"need 0 < pauc_limit <= limit <= 1, got {pauc_limit} and {limit}")
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(np.int8)
    fnmr0, thr = metrics.operating_thresholds(s, y, [fmr])
    threshold = float(thr[0])
    if not math.isfinite(threshold):
        raise ValueError(
            f"FMR {fmr:g} cannot be measured on {int((y == 0).sum())} impostor pairs "
            "(fewer than 1 / FMR); choose a larger --edc-fmr"
        )
    curves = {
        name: edc_curve(
            name,
            s,
            y,
            q,
            threshold,
            fmr,
            limit=limit,
            pauc_limit=pauc_limit,
            rederive_points=rederive_points,
        )
        for name, q in measures.items()
    }
    fnmr_fixed0 = float(np.mean(s[y == 1] < threshold))
    return QualityEvaluation(
        fmr=fmr,
        threshold=threshold,
        n_genuine=int((y == 1).sum()),
        n_impostor=int((y == 0).sum()),
        curves=curves,
        random=random_curve(fnmr_fixed0, limit=limit, pauc_limit=pauc_limit),
        oracle=oracle_curve(s, y, threshold, limit=limit, pauc_limit=pauc_limit),
        limit=limit,
    )
