"""Held-out validation of a fitted scorer against plain cosine, and the guard (issue 6).

On pairs the fit never saw, FNMR is measured at the calibration's FMR points (and at the
decade FMRs of its range, the *target* FMRs) for cosine and for the QMagFace score, with the
EER of both. The guard fails when the QMagFace score is worse than cosine at any judged
target FMR by more than ``max(abs_tolerance, tolerance * cosine_fnmr)``: such a scorer must not
become a candidate for champion. A target FMR ``f`` is judged only when the held-out impostors
allow at least ``min_false_matches`` false matches there (``f * N_impostor``): below that the
FNMR is decided by a handful of impostor scores, and the row is reported but noted as not
judged. With ``--compare-methods`` every calibration method is measured the same way
(``method_comparison``); the guard of the chosen method alone decides registration. Plain
numpy; the result is JSON-ready.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qmag_ray import metrics
from qmag_ray.calibration.result import CalibrationGrid, QMagFaceCalibration
from qmag_ray.fmr import allowed_excess, measurable

#: Below this many false matches an FNMR at FMR is marked as resting on little evidence.
FEW_FALSE_MATCHES = 10


def fmr_text(fmr: float) -> str:
    """``1e-03`` for a decade, ``1.12e-05`` otherwise (a raised grid floor)."""
    mantissa = fmr / 10.0 ** math.floor(math.log10(fmr))
    return f"{fmr:.0e}" if math.isclose(mantissa, 1.0, rel_tol=1e-6) else f"{fmr:.2e}"


def target_fmrs(grid: CalibrationGrid) -> list[float]:
    """The decade FMRs inside ``[fmr_min, fmr_max]``, plus both ends of the range."""
    lo, hi = math.log10(grid.floor), math.log10(grid.fmr_max)
    decades = [10.0**e for e in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    values = sorted({*decades, grid.floor, grid.fmr_max})
    out: list[float] = []
    for v in values:  # drop near-duplicates (an end that is a decade up to rounding)
        if not out or abs(math.log10(v) - math.log10(out[-1])) > 1e-6:
            out.append(v)
    return out


def _merge(grid_fmrs: list[float], targets: list[float]) -> list[float]:
    """Sorted union of the grid's FMRs and the targets; a target replaces a grid value equal
    to it up to rounding (``logspace`` gives 9.999999999999999e-06 for 1e-5)."""
    out = list(targets)
    for f in grid_fmrs:
        if not any(math.isclose(f, t, rel_tol=1e-6) for t in targets):
            out.append(float(f))
    return sorted(out)


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def held_out_comparison(
    cosine: np.ndarray,
    quality: np.ndarray,
    label: np.ndarray,
    calibration: QMagFaceCalibration,
    *,
    tolerance: float = 0.05,
    abs_tolerance: float = 0.0005,
    min_false_matches: int = 10,
) -> dict[str, Any]:
    """FNMR at FMR and EER, cosine vs the fitted scorer, on held-out pairs; with the guard.

    Returns a dict with ``n_genuine``, ``n_impostor``, ``rows`` (one per FMR: ``fmr``,
    ``target``, ``cosine_fnmr``, ``qmagface_fnmr``; None where the held-out impostors cannot
    measure the FMR), ``eer`` and ``guard`` (``passed``, ``reasons``, tolerances).
    """
    y = np.asarray(label).ravel()
    n_gen, n_imp = int((y == 1).sum()), int((y == 0).sum())
    if n_gen == 0 or n_imp == 0:
        raise ValueError(
            f"held-out pairs need genuine and impostor pairs; got {n_gen} genuine and "
            f"{n_imp} impostor pairs"
        )
    qmag = calibration.score(cosine, quality)
    targets = target_fmrs(calibration.grid)
    fmrs = _merge(list(calibration.fmrs), targets)
    cos_fnmr = metrics.fnmr_at_fmr(cosine, y, np.asarray(fmrs))
    q_fnmr = metrics.fnmr_at_fmr(qmag, y, np.asarray(fmrs))
    rows = [
        {
            "fmr": float(f),
            "target": any(math.isclose(f, t, rel_tol=1e-6) for t in targets),
            "cosine_fnmr": _num(c),
            "qmagface_fnmr": _num(q),
        }
        for f, c, q in zip(fmrs, cos_fnmr, q_fnmr, strict=True)
    ]
    eers = {"cosine": _num(metrics.eer(cosine, y)), "qmagface": _num(metrics.eer(qmag, y))}
    guard = check_guard(
        rows,
        n_imp,
        tolerance=tolerance,
        abs_tolerance=abs_tolerance,
        min_false_matches=min_false_matches,
    )
    return {
        "n_genuine": n_gen,
        "n_impostor": n_imp,
        "rows": rows,
        "eer": eers,
        "guard": guard,
        "convention": "FNMR at FMR per ISO/IEC 19795-1 (lowest FNMR with FMR <= target)",
    }


def check_guard(
    rows: list[dict[str, Any]],
    n_impostor: int,
    *,
    tolerance: float,
    abs_tolerance: float,
    min_false_matches: int = 10,
) -> dict[str, Any]:
    """The guard over the target rows of ``held_out_comparison``; see the module docstring."""
    reasons: list[str] = []
    failed = False
    measured = 0
    for row in (r for r in rows if r["target"]):
        c, q, f = row["cosine_fnmr"], row["qmagface_fnmr"], row["fmr"]
        if c is None or q is None:
            reasons.append(
                f"NOTE: FMR {fmr_text(f)} cannot be measured on {n_impostor} held-out "
                "impostor pairs"
            )
            continue
        if not measurable(f, n_impostor, min_false_matches):
            reasons.append(
                f"NOTE: FMR {fmr_text(f)} not judged: {n_impostor} held-out impostor pairs allow "
                f"{f * n_impostor:.1f} false matches there (fewer than {min_false_matches})"
            )
            continue
        measured += 1
        allowed = allowed_excess(c, abs_tolerance, tolerance)
        worse = q - c > allowed
        failed |= worse
        reasons.append(
            f"{'FAIL' if worse else 'PASS'}: FMR {fmr_text(f)}: QMagFace FNMR {100 * q:.3f}% vs "
            f"cosine {100 * c:.3f}% (allowed excess {100 * allowed:.3f} points)"
        )
    passed: bool | None = not failed
    if measured == 0:
        passed = None
        reasons.append("NOTE: no target FMR can be judged on the held-out pairs; guard not decided")
    return {
        "passed": passed,
        "reasons": reasons,
        "tolerance": tolerance,
        "abs_tolerance": abs_tolerance,
        "min_false_matches": min_false_matches,
    }


def not_evaluated(reason: str) -> dict[str, Any]:
    """The validation record when there is no held-out side."""
    return {"rows": [], "eer": {}, "guard": {"passed": None, "reasons": [f"NOTE: {reason}"]}}


def format_held_out(validation: dict[str, Any], *, targets_only: bool = True) -> str:
    """The held-out comparison as a console table (target FMRs only unless told otherwise)."""
    rows = [r for r in validation.get("rows", []) if r["target"] or not targets_only]
    if not rows:
        return "held-out validation: " + "; ".join(validation["guard"]["reasons"])

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.3f}"

    n_imp = validation["n_impostor"]

    def evidence(fmr: float) -> str:  # the false matches an FNMR at this FMR rests on
        n = int(math.floor(fmr * n_imp + 1e-9))
        return f"{n}{'*' if n < FEW_FALSE_MATCHES else ' '}"

    lines = [
        f"held-out: {validation['n_genuine']} genuine / {n_imp} impostor pairs",
        f"{'FNMR % @ FMR':<14}  {'cosine':>9}  {'QMagFace':>9}  {'false matches':>14}",
        "-" * 52,
    ]
    lines += [
        f"{fmr_text(r['fmr']):<14}  {pct(r['cosine_fnmr']):>9}  {pct(r['qmagface_fnmr']):>9}  "
        f"{evidence(r['fmr']):>14}"
        for r in rows
    ]
    eer = validation["eer"]
    lines.append(f"{'EER %':<14}  {pct(eer.get('cosine')):>9}  {pct(eer.get('qmagface')):>9}")
    if any(math.floor(r["fmr"] * n_imp + 1e-9) < FEW_FALSE_MATCHES for r in rows):
        lines.append(f"* fewer than {FEW_FALSE_MATCHES} false matches: that FNMR is a rough figure")
    guard = validation["guard"]
    verdict = {True: "PASSED", False: "FAILED", None: "NOT DECIDED"}[guard["passed"]]
    lines.append(f"guard (QMagFace not worse than cosine): {verdict}")
    lines += [f"  {r}" for r in guard["reasons"] if not r.startswith("PASS")]
    return "\n".join(lines)


def method_comparison(
    comparisons: dict[str, dict[str, Any]],
    calibrations: dict[str, QMagFaceCalibration],
    chosen: str,
) -> dict[str, Any]:
    """Every method's held-out figures side by side (``--compare-methods``), JSON-ready.

    ``comparisons`` maps each method to its ``held_out_comparison`` on the same held-out
    pairs (an empty dict when there is no held-out side). Returns ``chosen``, ``fits``
    (alpha, beta per method), ``rows`` (per FMR: ``fmr``, ``target``, ``cosine`` and one FNMR
    per method), ``eer`` and ``guard`` (each method's verdict, for information: only the
    chosen method's guard decides registration).
    """
    methods = list(calibrations)
    fits = {m: {"alpha": c.alpha, "beta": c.beta} for m, c in calibrations.items()}
    out: dict[str, Any] = {"chosen": chosen, "methods": methods, "fits": fits}
    if not all(comparisons.get(m) for m in methods):
        return {**out, "rows": [], "eer": {}, "guard": {}}
    first = comparisons[methods[0]]
    rows = []
    for i, row in enumerate(first["rows"]):
        entry = {"fmr": row["fmr"], "target": row["target"], "cosine": row["cosine_fnmr"]}
        for m in methods:
            other = comparisons[m]["rows"][i]
            if other["fmr"] != row["fmr"]:
                raise RuntimeError("held-out comparisons of the methods use different FMRs")
            entry[m] = other["qmagface_fnmr"]
        rows.append(entry)
    eer = {"cosine": first["eer"]["cosine"]}
    eer.update({m: comparisons[m]["eer"]["qmagface"] for m in methods})
    guard = {m: comparisons[m]["guard"]["passed"] for m in methods}
    return {
        **out,
        "n_genuine": first["n_genuine"],
        "n_impostor": first["n_impostor"],
        "rows": rows,
        "eer": eer,
        "guard": guard,
    }


def format_methods(comparison: dict[str, Any], *, targets_only: bool = True) -> str:
    """The method comparison as a console table: cosine and one column per method."""
    methods = comparison["methods"]
    names = ["cosine", *methods]

    def cells(values: list[str]) -> str:
        return "  ".join(f"{v:>9}" for v in values)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.3f}"

    lines = [f"methods (fitted on the fit side; chosen: {comparison['chosen']}):"]
    lines.append(f"{'':<14}  {cells(names)}")
    fits = comparison["fits"]
    for key in ("alpha", "beta"):
        lines.append(f"{key:<14}  {cells(['-', *[f'{fits[m][key]:.5f}' for m in methods]])}")
    rows = [r for r in comparison["rows"] if r["target"] or not targets_only]
    if not rows:
        lines.append("no held-out side: the methods are not compared on held-out pairs")
        return "\n".join(lines)
    lines.insert(
        1,
        f"held-out: {comparison['n_genuine']} genuine / {comparison['n_impostor']} impostor pairs",
    )
    lines.append(f"{'FNMR % @ FMR':<14}  " + "-" * (11 * len(names) - 2))
    lines += [f"{fmr_text(r['fmr']):<14}  {cells([pct(r[n]) for n in names])}" for r in rows]
    lines.append(f"{'EER %':<14}  {cells([pct(comparison['eer'].get(n)) for n in names])}")
    verdicts = {True: "PASSED", False: "FAILED", None: "-"}
    guard = [verdicts[comparison["guard"].get(m)] for m in methods]
    lines.append(f"{'guard':<14}  {cells(['', *guard])}")
    return "\n".join(lines)
