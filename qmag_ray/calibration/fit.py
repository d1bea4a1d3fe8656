"""Fitting alpha and beta (spec section 3): one pipeline, run in-process or on Ray.

The pipeline is: summarise every shard of pairs (per-weight impostor tails + genuine pairs),
merge, search every weight, pick the optimal weight per FMR, fit the line, then measure
operating thresholds of the fitted QMagFace score. An *executor* decides where the shard and
search steps run; ``LocalExecutor`` runs them here, ``distributed.RayExecutor`` as Ray tasks.
Both call the same numpy functions of ``search``, so their results are identical.

Methods: ``paper`` is the published algorithm (spec section 3); ``raw`` is the same search with
the thresholds taken on the raw adjusted score ``w * q + s`` (no sigmoid), so the line is fitted
on the scale ``omega`` is applied to; ``direct`` chooses alpha and beta for an FNMR objective by
an exact grid search (``direct``), starting from the published fit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from enum import Enum
from typing import Protocol

import numpy as np

from qmag_ray.calibration.direct import (
    MAX_TAIL_VALUES,
    DirectSearch,
    direct_search,
    evaluate_candidates,
    summarize_candidates,
)
from qmag_ray.calibration.result import CalibrationGrid, QMagFaceCalibration, fmr_key
from qmag_ray.calibration.search import fit_line, operating_points, search_weight, select_optimal
from qmag_ray.calibration.tails import (
    TailSummary,
    impostor_score_tail,
    summarize_blocks,
    tail_size,
)
from qmag_ray.pairs.source import ArrayPairSource, PairBlock, PairSource
from qmag_ray.scores import qmagface_score

logger = logging.getLogger(__name__)

#: FMRs at which the result records operating thresholds of the QMagFace score.
OPERATING_FMRS = (1e-2, 1e-3, 1e-4, 1e-5)


class CalibrationMethod(str, Enum):
    """How alpha and beta are chosen (see the module docstring)."""

    PAPER = "paper"
    RAW = "raw"
    DIRECT = "direct"


#: Calibration methods: the published one (spec section 3) and two named variants.
METHODS = tuple(m.value for m in CalibrationMethod)


def method_name(method: CalibrationMethod | str) -> str:
    """The method as its text; ``ValueError`` naming the choices for an unknown one."""
    value = method.value if isinstance(method, CalibrationMethod) else str(method)
    if value not in METHODS:
        raise ValueError(f"unknown calibration method {value!r}; available: {', '.join(METHODS)}")
    return value


class Executor(Protocol):
    """Where the per-shard and per-weight steps of the pipeline run."""

    name: str

    def summarize(self, weights: np.ndarray, k: int) -> TailSummary: ...

    def search(
        self, summary: TailSummary, fmrs: np.ndarray, *, raw: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(thresholds, accepted genuine counts), each (n_weights, n_fmr); may consume the
        summary's tails (the pipeline needs only its genuine pairs afterwards). ``raw``:
        thresholds on ``w * q + s`` instead of its sigmoid."""
        ...

    def score_tail(self, alpha: float, beta: float, k: int) -> tuple[np.ndarray, int]: ...

    def evaluate_candidates(self, candidates: np.ndarray, k: int, fmrs: np.ndarray) -> np.ndarray:
        """Accepted genuine counts (n_candidates, n_fmr) of (alpha, beta) candidates at FMR
        <= f, from per-candidate impostor tails of size ``k`` (the ``direct`` method)."""
        ...


class LocalExecutor:
    """Runs every step in this process, shard after shard."""

    name = "local"

    def __init__(self, source: PairSource) -> None:
        self.source = source

    def summarize(self, weights: np.ndarray, k: int) -> TailSummary:
        # One stream over every shard: the same multiset as per-shard summaries merged, with
        # one set of tails in memory instead of two.
        total = self.source.num_shards()

        def blocks() -> Iterator[PairBlock]:
            for index in range(total):
                yield from self.source.shard_blocks(index)
                logger.info("calibration: shard %d/%d summarised", index + 1, total)

        return summarize_blocks(blocks(), weights, k)

    def search(
        self, summary: TailSummary, fmrs: np.ndarray, *, raw: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        gen_c, gen_q, n_imp = summary.genuine_cosine, summary.genuine_quality, summary.n_impostor
        out = [
            search_weight(w, summary.tails[i], gen_c, gen_q, n_imp, fmrs, raw=raw)
            for i, w in enumerate(summary.weights)
        ]
        return np.stack([t for t, _ in out]), np.stack([a for _, a in out])

    def score_tail(self, alpha: float, beta: float, k: int) -> tuple[np.ndarray, int]:
        total = self.source.num_shards()
        blocks = (b for index in range(total) for b in self.source.shard_blocks(index))
        return impostor_score_tail(blocks, alpha, beta, k)

    def evaluate_candidates(self, candidates: np.ndarray, k: int, fmrs: np.ndarray) -> np.ndarray:
        # As many candidates per pass over the pairs as MAX_TAIL_VALUES tail values allow.
        per_pass = max(1, MAX_TAIL_VALUES // max(k, 1))
        total = self.source.num_shards()
        out = []
        for lo in range(0, len(candidates), per_pass):
            chunk = candidates[lo : lo + per_pass]
            blocks = (b for index in range(total) for b in self.source.shard_blocks(index))
            summary = summarize_candidates(blocks, chunk, k)
            gen_c, gen_q = summary.genuine_cosine, summary.genuine_quality
            out.append(
                evaluate_candidates(chunk, summary.tails, gen_c, gen_q, summary.n_impostor, fmrs)
            )
        return np.concatenate(out)


def check_data(n_genuine: int, n_impostor: int, grid: CalibrationGrid) -> None:
    """Refuse ill-posed calibration data with an error that says what is missing."""
    if n_genuine <= 0:
        raise ValueError(
            f"calibration needs genuine pairs (label 1); the data has none "
            f"({n_impostor} impostor pairs)"
        )
    if n_impostor <= 0:
        raise ValueError(
            f"calibration needs impostor pairs (label 0); the data has none "
            f"({n_genuine} genuine pairs)"
        )
    if n_impostor * grid.fmr_min < 1:
        raise ValueError(
            f"FMR {grid.fmr_min:g} cannot be measured on {n_impostor} impostor pairs; the "
            f"smallest FMR this data supports is ~1/N = {1 / n_impostor:.3g}; set fmr_min >= "
            "that (or provide more impostor pairs)"
        )


def supported_fmrs(fmrs: tuple[float, ...], n_impostor: int) -> list[float]:
    """The FMRs that ``n_impostor`` impostor pairs can measure (at least one false match)."""
    return [f for f in fmrs if f * n_impostor >= 1 - 1e-9]


def run_calibration(
    executor: Executor,
    source: PairSource,
    grid: CalibrationGrid,
    *,
    method: str = "paper",
    direct: DirectSearch | None = None,
) -> QMagFaceCalibration:
    """The calibration pipeline on ``source`` with ``executor``; see the module docstring.

    ``direct`` holds the settings of the ``direct`` method (its defaults when None).
    """
    method = method_name(method)
    n_gen, n_imp = source.counts()
    check_data(n_gen, n_imp, grid)
    weights = grid.weights(float(source.max_quality()))
    fmrs = grid.fmrs()
    k = tail_size(n_imp, grid.fmr_max)
    logger.info(
        "calibration: %d genuine, %d impostor pairs in %d shard(s); %d weights x %d FMRs; "
        "impostor tail %d per weight",
        n_gen,
        n_imp,
        source.num_shards(),
        len(weights),
        len(fmrs),
        k,
    )
    summary = executor.summarize(weights, k)
    if (summary.n_genuine, summary.n_impostor) != (n_gen, n_imp):
        raise RuntimeError(
            f"{type(source).__name__} reported {n_gen} genuine / {n_imp} impostor pairs but its "
            f"shards held {summary.n_genuine} / {summary.n_impostor}"
        )
    thresholds, accepted = executor.search(summary, fmrs, raw=method == "raw")
    _, w_opt, t_opt = select_optimal(weights, thresholds, accepted, n_gen, fmrs)
    alpha, beta = fit_line(t_opt, w_opt)
    logger.info("calibration: alpha=%.6f beta=%.6f (%s line fit)", alpha, beta, method)
    method_extra: dict[str, object] = {}
    if method == "direct":
        # Candidates' tails have the size of the weights' tails: both serve FMR <= fmr_max.
        found = direct_search(
            lambda candidates: executor.evaluate_candidates(candidates, k, fmrs),
            (alpha, beta),
            float(source.max_quality()),
            grid.max_ratio,
            n_gen,
            direct or DirectSearch(),
            progress=lambda text: logger.info("calibration: direct %s", text),
        )
        alpha, beta = found.alpha, found.beta
        method_extra["direct"] = found.record()
        logger.info("calibration: direct alpha=%.6f beta=%.6f", alpha, beta)

    op_fmrs = supported_fmrs(OPERATING_FMRS, n_imp)
    op_thr: dict[str, float] = {}
    op_fnmr: dict[str, float] = {}
    if op_fmrs:
        tail, count = executor.score_tail(alpha, beta, tail_size(n_imp, max(op_fmrs)))
        if count != n_imp:
            raise RuntimeError(f"second pass over the pairs saw {count} impostors, not {n_imp}")
        gen = qmagface_score(summary.genuine_cosine, summary.genuine_quality, alpha, beta)
        thr, acc = operating_points(gen, -np.sort(-tail), n_imp, np.array(op_fmrs), strict=False)
        for f, t, a in zip(op_fmrs, thr, acc, strict=True):
            if np.isfinite(t):
                op_thr[fmr_key(f)] = float(t)
                op_fnmr[fmr_key(f)] = float((n_gen - a) / n_gen)

    fnmr_table = (n_gen - accepted) / n_gen
    line = method != "direct"  # direct's alpha, beta do not come from the line fit
    return QMagFaceCalibration(
        alpha=alpha,
        beta=beta,
        method=method,
        grid=grid,
        weights=[float(w) for w in weights] if line else [],
        fmrs=[float(f) for f in fmrs],
        optimal_weights=[float(w) for w in w_opt] if line else [],
        optimal_thresholds=[float(t) for t in t_opt] if line else [],
        fnmr_table=fnmr_table.tolist() if line else [],
        n_genuine=int(n_gen),
        n_impostor=int(n_imp),
        fingerprint=source.fingerprint(),
        thresholds=op_thr,
        extra={
            "executor": executor.name,
            "shards": int(source.num_shards()),
            "impostor_tail": int(k),
            "operating_fnmr": op_fnmr,
            "threshold_convention": "match iff qmagface score >= threshold; FMR <= target",
            **method_extra,
        },
    )


def calibrate(
    source: PairSource,
    grid: CalibrationGrid | None = None,
    *,
    method: str = "paper",
    direct: DirectSearch | None = None,
) -> QMagFaceCalibration:
    """Fit alpha and beta on any ``PairSource`` in this process (no Ray)."""
    executor = LocalExecutor(source)
    return run_calibration(
        executor, source, grid or CalibrationGrid(), method=method, direct=direct
    )


def fit_qmagface(
    cosine: np.ndarray,
    quality: np.ndarray,
    label: np.ndarray,
    *,
    n_fmr: int = 50,
    fmr_min: float = 1e-5,
    fmr_max: float = 1e-2,
    n_weights: int = 20,
    max_ratio: float = 0.5,
    grid: CalibrationGrid | None = None,
    method: str = "paper",
    direct: DirectSearch | None = None,
) -> QMagFaceCalibration:
    """Fit QMagFace's alpha and beta on score arrays, exactly as spec section 3 (no Ray needed).

    Args:
        cosine: cosine score of each pair.
        quality: pair quality, ``min(||e_a||, ||e_b||)``.
        label: 1 for genuine (mated) pairs, 0 for impostor pairs.
        n_fmr, fmr_min, fmr_max, n_weights, max_ratio: the search grid (paper's defaults);
            alternatively pass a whole ``grid``.
        method: ``paper`` (spec section 3, the default), ``raw`` or ``direct`` (see the module
            docstring and ``qmag_ray.calibration.direct``).
        direct: settings of the ``direct`` search (its defaults when None).

    Returns:
        The fitted ``QMagFaceCalibration`` (JSON-serialisable).
    """
    keywords = CalibrationGrid(
        n_fmr=n_fmr, fmr_min=fmr_min, fmr_max=fmr_max, n_weights=n_weights, max_ratio=max_ratio
    )
    if grid is not None and keywords != CalibrationGrid():
        raise ValueError("pass either grid=... or the grid keywords, not both")
    source = ArrayPairSource(cosine, quality, label)
    return calibrate(source, grid or keywords, method=method, direct=direct)
