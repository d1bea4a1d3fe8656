"""The ``direct`` calibration method: alpha and beta chosen for the FNMR objective, exactly.

Objective. A candidate ``(alpha, beta)`` gives every pair the QMagFace score
``s_hat = s + min(0, beta * s - alpha) * q`` (spec section 2). At every FMR ``f`` of the
calibration grid (``n_fmr`` values log-spaced in ``[fmr_min, fmr_max]``, the FMRs the
per-weight search uses) its FNMR is measured as users measure it (ISO/IEC 19795-1: the lowest
FNMR among thresholds whose FMR is ``<= f``), and the objective, lower is better, is::

    J(alpha, beta) = mean over f of log10(max(FNMR(f), 0.5 / N_genuine))

The floor counts an FNMR of zero as half a miss, so ``J`` stays finite and a candidate with
no misses at some FMRs still ranks by the others.

Exactness. For a fixed candidate only the ``(m(f) + 1)``-th highest impostor scores decide the
thresholds with FMR ``<= f`` (the argument of spec section 3, per candidate instead of per
weight); ``evaluate_candidates`` finds them for a whole batch of candidates at once with the
histogram passes of ``orderstats`` (every candidate a row of the same passes), so the FNMRs
are exact and the passes over the pairs do not grow with the pairs.

Search (``DirectSearch``). Bounds: ``alpha`` in ``[0, A]``, ``beta`` in ``[0, B]`` with
``A = span * max(alpha_paper, m)``, ``B = span * max(beta_paper, m)``, where
``(alpha_paper, beta_paper)`` is the published fit on the same pairs, ``m = max_ratio /
max(q)`` the half range of its weight grid, and ``span = 2``. The box is the QMagFace family
(``omega <= 0``, stronger adjustment for lower cosines, high cosines left alone), holds plain
cosine ``(0, 0)`` at a corner and the published fit well inside. A ``coarse x coarse`` grid
(41 x 41) covers the box; then each of ``rounds`` refinement rounds evaluates a
``points x points`` pattern around the best so far, its spacing half the previous round's
(the first: half the coarse spacing), clipped to the box. Ties go to the smaller adjustment
(``alpha / A + beta / B``), then to the earlier candidate. Cosine is a candidate, so the fit
is never worse than cosine on the objective of the calibration pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmag_ray.calibration.orderstats import PassPlan, PassResult, ScoreRows, order_statistics
from qmag_ray.calibration.search import (
    impostor_counts,
    rank_values,
    thresholds_at_bounds,
    wanted_ranks,
)
from qmag_ray.config import Settings, option, settings
from qmag_ray.scores import qmagface_score

OBJECTIVE = "mean over the grid FMRs of log10(max(FNMR at FMR <= f, 0.5 / n_genuine))"
BOUNDS_RULE = "alpha in [0, span * max(alpha_paper, m)], beta in [0, span * max(beta_paper, m)]"


@settings
class DirectSearch(Settings):
    """Settings of the ``direct`` search; see the module docstring."""

    coarse: int = option(41, "direct method: points per axis of the coarse grid.", ge=2)
    rounds: int = option(6, "direct method: refinement rounds around the best point.", ge=0)
    points: int = option(5, "direct method: points per axis of a refinement (odd, >= 3).", ge=3)
    span: float = option(
        2.0, "direct method: the search box, as a multiple of the published fit.", gt=0
    )

    def check(self) -> None:
        if self.points % 2 == 0:
            raise ValueError(f"`points` must be odd and >= 3, got {self.points}")


def search_bounds(
    alpha_paper: float, beta_paper: float, max_quality: float, max_ratio: float, span: float
) -> tuple[float, float]:
    """The upper bounds ``(A, B)`` of the box; the lower bounds are 0."""
    m = max_ratio / max_quality
    return span * max(alpha_paper, m), span * max(beta_paper, m)


def evaluate_candidates(
    run_pass: Callable[[PassPlan], PassResult],
    candidates: np.ndarray,
    genuine_cosine: np.ndarray,
    genuine_quality: np.ndarray,
    n_impostor: int,
    fmrs: np.ndarray,
    max_quality: float,
) -> tuple[np.ndarray, int]:
    """Accepted genuine pairs (n_candidates, n_fmr) at FMR ``<= f``, exactly, and the number
    of passes over the pairs used (all candidates share each pass)."""
    candidates = np.asarray(candidates, np.float64).reshape(-1, 2)
    m = impostor_counts(n_impostor, fmrs, strict=False)
    ranks = wanted_ranks(m, n_impostor)
    rows = ScoreRows("qmagface", candidates, max_quality)
    stats = order_statistics(run_pass, rows, ranks, n_impostor, genuine=False)
    out = np.empty((len(candidates), len(fmrs)), dtype=np.int64)
    for i, (alpha, beta) in enumerate(candidates):
        genuine = qmagface_score(genuine_cosine, genuine_quality, float(alpha), float(beta))
        bound, top = rank_values(stats.values[i], ranks, m, n_impostor)
        out[i] = thresholds_at_bounds(genuine, bound, top)[1]
    return out, stats.passes


def objective(accepted: np.ndarray, n_genuine: int) -> np.ndarray:
    """``J`` of each candidate (row of accepted counts); see the module docstring."""
    fnmr = (n_genuine - np.asarray(accepted, np.float64)) / n_genuine
    return np.log10(np.maximum(fnmr, 0.5 / n_genuine)).mean(axis=1)


def _pick(values: np.ndarray, candidates: np.ndarray, bounds: tuple[float, float]) -> int:
    """Index of the lowest objective; ties: smaller ``alpha / A + beta / B``, then earlier."""
    size = candidates[:, 0] / bounds[0] + candidates[:, 1] / bounds[1]
    tied = np.flatnonzero(values == values.min())
    return int(tied[np.argmin(size[tied])])


def coarse_grid(bounds: tuple[float, float], n: int) -> np.ndarray:
    """``n x n`` candidates on ``[0, A] x [0, B]``, alpha-major; (0, 0) exactly first."""
    a = bounds[0] * np.arange(n) / (n - 1)
    b = bounds[1] * np.arange(n) / (n - 1)
    aa, bb = np.meshgrid(a, b, indexing="ij")
    return np.column_stack([aa.ravel(), bb.ravel()])


def refine_grid(
    center: np.ndarray, step: tuple[float, float], points: int, bounds: tuple[float, float]
) -> np.ndarray:
    """A ``points x points`` pattern around ``center``, clipped to the box, deduplicated."""
    offsets = np.arange(points) - points // 2
    a = np.clip(center[0] + offsets * step[0], 0.0, bounds[0])
    b = np.clip(center[1] + offsets * step[1], 0.0, bounds[1])
    aa, bb = np.meshgrid(a, b, indexing="ij")
    return np.unique(np.column_stack([aa.ravel(), bb.ravel()]), axis=0)


@dataclass(frozen=True)
class DirectFit:
    """The chosen ``(alpha, beta)`` and the record of the search (``record()`` is JSON)."""

    alpha: float
    beta: float
    value: float
    fnmr: list[float]
    details: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"objective_value": self.value, "fnmr_at_grid_fmrs": self.fnmr, **self.details}


def direct_search(
    evaluate: Callable[[np.ndarray], np.ndarray],
    paper: tuple[float, float],
    max_quality: float,
    max_ratio: float,
    n_genuine: int,
    settings: DirectSearch,
    progress: Callable[[str], None] | None = None,
) -> DirectFit:
    """Coarse grid, then refinement; ``evaluate(candidates)`` returns accepted counts."""
    bounds = search_bounds(paper[0], paper[1], max_quality, max_ratio, settings.span)
    coarse = coarse_grid(bounds, settings.coarse)
    # The published fit is evaluated alongside, for the record only (it may lie outside).
    accepted = evaluate(np.vstack([coarse, [paper]]))
    values = objective(accepted, n_genuine)
    paper_value, values, accepted = float(values[-1]), values[:-1], accepted[:-1]
    cosine_value = float(values[0])  # coarse[0] is (0, 0): plain cosine
    i = _pick(values, coarse, bounds)
    best, best_value, best_accepted = coarse[i], float(values[i]), accepted[i]
    evaluations = len(coarse) + 1
    history = [{"stage": "coarse", "alpha": best[0], "beta": best[1], "objective": best_value}]
    if progress:
        progress(f"coarse {settings.coarse}x{settings.coarse}: objective {best_value:.4f}")
    step = (bounds[0] / (settings.coarse - 1), bounds[1] / (settings.coarse - 1))
    for r in range(1, settings.rounds + 1):
        step = (step[0] / 2, step[1] / 2)
        cands = refine_grid(best, step, settings.points, bounds)
        accepted = evaluate(cands)
        values = objective(accepted, n_genuine)
        evaluations += len(cands)
        j = _pick(values, cands, bounds)  # the pattern holds the current best at its centre
        best, best_value, best_accepted = cands[j], float(values[j]), accepted[j]
        history.append(
            {"stage": f"round {r}", "alpha": best[0], "beta": best[1], "objective": best_value}
        )
        if progress:
            progress(f"refinement round {r}/{settings.rounds}: objective {best_value:.4f}")
    fnmr = ((n_genuine - best_accepted) / n_genuine).tolist()
    details = {
        "objective": OBJECTIVE,
        "log_floor": 0.5 / n_genuine,
        "bounds": {"alpha": [0.0, bounds[0]], "beta": [0.0, bounds[1]]},
        "bounds_rule": BOUNDS_RULE,
        "m": max_ratio / max_quality,
        "settings": dataclasses.asdict(settings),
        "evaluations": evaluations,
        "objective_cosine": cosine_value,
        "paper_fit": {"alpha": paper[0], "beta": paper[1], "objective": paper_value},
        "history": [{k: float(v) if k != "stage" else v for k, v in h.items()} for h in history],
    }
    return DirectFit(float(best[0]), float(best[1]), best_value, fnmr, details)
