"""Fitting alpha and beta (spec section 3): one pipeline, run in-process or on Ray.

The pipeline is: find, per candidate weight, the exact impostor order statistics the FMR grid
needs by histogram passes over the pairs (``orderstats``; the first pass also collects the
genuine pairs), search every weight, pick the optimal weight per FMR, fit the line, then
measure operating thresholds of the fitted QMagFace score the same way. An *executor* decides
where a pass runs; ``LocalExecutor`` here, ``distributed.RayExecutor`` as one Ray task per
shard. Both call the same numpy functions, so their results are identical.

Methods: ``paper`` is the published algorithm (spec section 3); ``raw`` is the same search with
the thresholds taken on the raw adjusted score ``w * q + s`` (no sigmoid), so the line is fitted
on the scale ``omega`` is applied to; ``direct`` chooses alpha and beta for an FNMR objective by
an exact grid search (``direct``), starting from the published fit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from enum import Enum
from typing import Protocol

import numpy as np

from qmag_ray.calibration.direct import DirectSearch, direct_search, evaluate_candidates
from qmag_ray.calibration.orderstats import (
    PassPlan,
    PassResult,
    ScoreRows,
    order_statistics,
    scan_blocks,
    shard_stream,
)
from qmag_ray.calibration.result import CalibrationGrid, QMagFaceCalibration
from qmag_ray.calibration.search import (
    fit_line,
    impostor_counts,
    rank_values,
    search_weight,
    select_optimal,
    thresholds_at_bounds,
    wanted_ranks,
)
from qmag_ray.fmr import OPERATING_FMRS, fmr_key, measurable, supported_fmrs
from qmag_ray.pairs.source import ArrayPairSource, PairBlock, PairSource
from qmag_ray.scores import qmagface_score

logger = logging.getLogger(__name__)


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
    """Where the passes over the pairs run: ``run_pass`` applies one ``PassPlan`` to every
    shard (``orderstats.scan_blocks``) and returns the merged ``PassResult``. Everything
    else of the pipeline is cheap and runs on the caller."""

    name: str

    def run_pass(self, plan: PassPlan) -> PassResult: ...


class LocalExecutor:
    """Runs every pass in this process, shard after shard (one stream, one result)."""

    name = "local"

    def __init__(self, source: PairSource) -> None:
        self.source = source

    def run_pass(self, plan: PassPlan) -> PassResult:
        total = self.source.num_shards()

        def blocks() -> Iterator[PairBlock]:
            for index in range(total):
                yield from shard_stream(self.source, index)
                logger.debug("calibration: shard %d/%d scanned", index + 1, total)

        return scan_blocks(blocks(), plan)


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
    if not measurable(grid.floor, n_impostor):
        raise ValueError(
            f"--fmr-min (grid.fmr_min) {grid.floor:g} cannot be measured on {n_impostor} "
            f"impostor pairs (smallest measurable FMR 1/N = {1 / n_impostor:.3g}); leave "
            "--fmr-min unset to start at what the data supports, or give more impostor pairs "
            "(--impostors-per-side, generate.impostors_per_side)"
        )


def resolve_grid(grid: CalibrationGrid, n_impostor: int) -> tuple[CalibrationGrid, str | None]:
    """``grid`` with its floor fixed for ``n_impostor`` impostor pairs, and a note if raised.

    A grid without ``fmr_min`` starts at the paper's 1e-5 when the data can measure it; with
    fewer than 1e5 impostor pairs it starts at 1/N (one false match), the smallest FMR they
    measure, and the note says so. A given ``fmr_min`` is returned unchanged (``check_data``
    refuses it when the data cannot measure it).
    """
    if grid.fmr_min is not None or n_impostor <= 0:
        return dataclasses.replace(grid, fmr_min=grid.floor), None
    if measurable(grid.floor, n_impostor):
        return dataclasses.replace(grid, fmr_min=grid.floor), None
    step = 10.0 ** (math.floor(math.log10(1.0 / n_impostor)) - 2)  # 3 significant digits, up
    floor = float(f"{math.ceil(1.0 / n_impostor / step - 1e-9) * step:.3g}")
    if floor >= grid.fmr_max:
        raise ValueError(
            f"{n_impostor} impostor pairs measure no FMR below 1/N = {1 / n_impostor:.3g}, "
            f"not below the grid's --fmr-max (grid.fmr_max) {grid.fmr_max:g}: give more "
            "impostor pairs (--impostors-per-side, generate.impostors_per_side) or a larger "
            "--fmr-max"
        )
    note = (
        f"grid FMR floor raised from {grid.floor:g} to {floor:.3g}: {n_impostor} impostor pairs "
        f"measure no smaller FMR (--fmr-min sets it; --impostors-per-side gives more impostors)"
    )
    return dataclasses.replace(grid, fmr_min=floor), note


def _run_pipeline(
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
    grid, grid_note = resolve_grid(grid, n_imp)
    check_data(n_gen, n_imp, grid)
    if grid_note:
        logger.info("calibration: %s", grid_note)
    max_q = float(source.max_quality())
    weights = grid.weights(max_q)
    fmrs = grid.fmrs()
    logger.info(
        "calibration: %d genuine, %d impostor pairs in %d shard(s); %d weights x %d FMRs",
        n_gen,
        n_imp,
        source.num_shards(),
        len(weights),
        len(fmrs),
    )
    m = impostor_counts(n_imp, fmrs, strict=True)
    ranks = wanted_ranks(m, n_imp)
    stats = order_statistics(executor.run_pass, ScoreRows("logit", weights, max_q), ranks, n_imp)
    first = stats.first
    if (first.n_genuine, first.n_impostor) != (n_gen, n_imp):
        raise RuntimeError(
            f"{type(source).__name__} reported {n_gen} genuine / {n_imp} impostor pairs but its "
            f"shards held {first.n_genuine} / {first.n_impostor}"
        )
    gen_c, gen_q = first.genuine_cosine, first.genuine_quality
    passes = {"weights": stats.passes}
    rows = [
        search_weight(
            w, *rank_values(stats.values[i], ranks, m, n_imp), gen_c, gen_q, raw=method == "raw"
        )
        for i, w in enumerate(weights)
    ]
    thresholds, accepted = np.stack([t for t, _ in rows]), np.stack([a for _, a in rows])
    _, w_opt, t_opt = select_optimal(weights, thresholds, accepted, n_gen, fmrs)
    alpha, beta = fit_line(t_opt, w_opt)
    logger.info("calibration: alpha=%.6f beta=%.6f (%s line fit)", alpha, beta, method)
    method_extra: dict[str, object] = {}
    if method == "direct":
        direct_passes = [0]

        def evaluate(candidates: np.ndarray) -> np.ndarray:
            accepted, used = evaluate_candidates(
                executor.run_pass, candidates, gen_c, gen_q, n_imp, fmrs, max_q
            )
            direct_passes[0] += used
            return accepted

        found = direct_search(
            evaluate,
            (alpha, beta),
            max_q,
            grid.max_ratio,
            n_gen,
            direct or DirectSearch(),
            progress=lambda text: logger.debug("calibration: direct %s", text),
        )
        alpha, beta = found.alpha, found.beta
        method_extra["direct"] = found.record()
        passes["direct"] = direct_passes[0]
        logger.info("calibration: direct alpha=%.6f beta=%.6f", alpha, beta)

    op_fmrs = supported_fmrs(OPERATING_FMRS, n_imp)
    op_thr: dict[str, float] = {}
    op_fnmr: dict[str, float] = {}
    if op_fmrs:
        m_op = impostor_counts(n_imp, np.array(op_fmrs), strict=False)
        ranks_op = wanted_ranks(m_op, n_imp)
        rows_op = ScoreRows("qmagface", np.array([[alpha, beta]]), max_q)
        op = order_statistics(executor.run_pass, rows_op, ranks_op, n_imp, genuine=False)
        passes["operating"] = op.passes
        gen = qmagface_score(gen_c, gen_q, alpha, beta)
        thr, acc = thresholds_at_bounds(gen, *rank_values(op.values[0], ranks_op, m_op, n_imp))
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
            "passes": passes,
            "operating_fnmr": op_fnmr,
            "threshold_convention": "match iff qmagface score >= threshold; FMR <= target",
            **({"grid_note": grid_note} if grid_note else {}),
            **method_extra,
        },
    )


def fit_pairs(
    source: PairSource,
    grid: CalibrationGrid | None = None,
    *,
    executor: Executor | None = None,
    method: str = "paper",
    direct: DirectSearch | None = None,
) -> QMagFaceCalibration:
    """Fit alpha and beta on a ``PairSource``: the public fit on pairs (``fit_qmagface`` is
    the one on score arrays).

    Args:
        source: the calibration pairs in shards (listed, generated, exhaustive or arrays).
        grid: the search grid (the paper's by default).
        executor: where the shard and search steps run: None runs them in this process
            (``LocalExecutor``); ``qmag_ray.calibration.distributed.RayExecutor(source)`` as Ray
            tasks; ``qmag_ray.calibration.device.DeviceExecutor`` / ``RayDeviceExecutor`` on
            torch devices. Every executor gives the same result.
        method, direct: the calibration method and the ``direct`` search's settings.
    """
    return _run_pipeline(
        executor or LocalExecutor(source),
        source,
        grid or CalibrationGrid(),
        method=method,
        direct=direct,
    )


def fit_qmagface(
    cosine: np.ndarray,
    quality: np.ndarray,
    label: np.ndarray,
    *,
    n_fmr: int = 50,
    fmr_min: float | None = None,
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
        n_fmr, fmr_min, fmr_max, n_weights, max_ratio: the search grid (paper's defaults;
            ``fmr_min=None`` starts at 1e-5 or at what the impostor pairs can measure, see
            ``resolve_grid``); alternatively pass a whole ``grid``.
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
    return fit_pairs(source, grid or keywords, method=method, direct=direct)
