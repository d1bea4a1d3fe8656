"""Identification metrics (ISO/IEC 19795-1 terms) from ranked candidate lists (numpy).

Closed set: over mated searches (probes whose identity is enrolled), the CMC's rank-k rate is
the fraction whose first gallery entry of the probe's identity is among the top k candidates.
Open set: at threshold t, FPIR(t) is the fraction of non-mated searches (identity not enrolled)
whose best candidate scores >= t; DIR(t) (TPIR) the fraction of mated searches whose mate is the
rank-1 candidate with a score >= t. DIR at FPIR f uses the lowest threshold whose FPIR is at most
f (the most mated searches it can accept); it is reported only where the non-mated searches can
measure f (at least one false alarm allowed: ``f * N_nonmated >= 1``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from qmag_ray.calibration.result import fmr_key

RANKS = (1, 5, 10, 20)
FPIRS = (1e-3, 1e-2, 1e-1)


def mate_ranks(
    index: np.ndarray, gallery_identity: np.ndarray, probe_identity: np.ndarray
) -> np.ndarray:
    """1-based rank of each probe's first same-identity candidate; 0 when not in the list.

    ``index`` is (P, k) gallery rows (-1 = no candidate); identities compare as strings, and a
    gallery identity of None (a distractor) matches nothing.
    """
    g = np.array([None if x is None else str(x) for x in gallery_identity], dtype=object)
    p = np.array([str(x) for x in probe_identity], dtype=object)
    codes, _ = pd.factorize(np.concatenate([g, p]), use_na_sentinel=True)
    g_code, p_code = codes[: len(g)], codes[len(g) :]
    g_code = np.where(pd.isna(g), -2, g_code)  # distractors: a code no probe has
    cand = np.where(index >= 0, g_code[np.maximum(index, 0)], -3)
    hit = cand == p_code[:, None]
    first = hit.argmax(axis=1)
    return np.where(hit.any(axis=1), first + 1, 0).astype(np.int64)


def cmc(ranks: np.ndarray, ks: tuple[int, ...] = RANKS) -> dict[str, float | None]:
    """Rank-k identification rates of mated searches (``ranks`` from :func:`mate_ranks`)."""
    r = np.asarray(ranks)
    if len(r) == 0:
        return {str(k): None for k in ks}
    return {str(k): float(np.mean((r >= 1) & (r <= k))) for k in ks}


def dir_at_fpir(
    mated_top1: np.ndarray,
    mated_rank1: np.ndarray,
    nonmated_top1: np.ndarray,
    fpirs: tuple[float, ...] = FPIRS,
) -> dict[str, dict[str, float | None]]:
    """DIR (TPIR) at each FPIR: ``{key: {"dir", "threshold", "fpir"}}`` (None: not measurable).

    Args:
        mated_top1: best candidate score of each mated search.
        mated_rank1: whether that candidate is the mate.
        nonmated_top1: best candidate score of each non-mated search.
    """
    nm = np.sort(np.asarray(nonmated_top1, np.float64))[::-1]
    s = np.asarray(mated_top1, np.float64)
    ok = np.asarray(mated_rank1, bool)
    out: dict[str, dict[str, float | None]] = {}
    thr: float | None
    for f in fpirs:
        key = fmr_key(f)
        n = len(nm)
        if n == 0 or f * n < 1 - 1e-9 or len(s) == 0:
            out[key] = {"dir": None, "threshold": None, "fpir": None}
            continue
        allowed = int(math.floor(f * n + 1e-9))
        if allowed >= n:
            thr = None  # every search accepted
            accepted = ok
            fpir = 1.0
        else:
            # accept strictly above the (allowed + 1)-th highest non-mated score
            cut = nm[allowed]
            thr = float(np.nextafter(cut, math.inf))
            accepted = ok & (s > cut)
            fpir = float(np.mean(nm > cut))
        out[key] = {"dir": float(np.mean(accepted)), "threshold": thr, "fpir": fpir}
    return out


def identification_report(
    index: np.ndarray,
    score: np.ndarray,
    gallery_identity: np.ndarray,
    probe_identity: np.ndarray,
    *,
    ranks: tuple[int, ...] = RANKS,
    fpirs: tuple[float, ...] = FPIRS,
) -> dict[str, Any]:
    """CMC of the mated searches and DIR at FPIR, from (P, k) candidate lists of one score."""
    enrolled = {str(x) for x in gallery_identity if x is not None}
    probe_identity = np.asarray(probe_identity, dtype=object)
    mated = np.array([str(x) in enrolled for x in probe_identity], dtype=bool)
    r = mate_ranks(index[mated], gallery_identity, probe_identity[mated])
    top1 = np.asarray(score[:, 0], np.float64) if score.shape[1] else np.full(len(score), -np.inf)
    return {
        "n_mated": int(mated.sum()),
        "n_nonmated": int((~mated).sum()),
        "cmc": cmc(r, ranks),
        "dir_at_fpir": dir_at_fpir(top1[mated], r == 1, top1[~mated], fpirs),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}"


def format_report(reports: dict[str, dict[str, Any]], title: str = "") -> str:
    """Cosine and QMagFace side by side: rank-k rates and DIR at FPIR, in percent."""
    names = list(reports)
    first = reports[names[0]]
    lines = [
        f"{title}{first['n_mated']} mated / {first['n_nonmated']} non-mated searches",
        f"{'metric':<22}" + "".join(f"{n:>12}" for n in names),
    ]
    for k in first["cmc"]:
        lines.append(
            f"{'rank-' + k + ' %':<22}"
            + "".join(f"{_pct(reports[n]['cmc'][k]):>12}" for n in names)
        )
    for key in first["dir_at_fpir"]:
        lines.append(
            f"{'DIR % @ FPIR ' + key:<22}"
            + "".join(f"{_pct(reports[n]['dir_at_fpir'][key]['dir']):>12}" for n in names)
        )
    return "\n".join(lines)
