"""Held-out validation of a fitted scorer against plain cosine, and the guard (issue 6).

On pairs the fit never saw, FNMR is measured at the calibration's FMR points (and at the
decade FMRs of its range, the *target* FMRs) for cosine and for the QMagFace score, with the
EER of both. The guard fails when the QMagFace score is worse than cosine at any judged
target FMR by more than ``max(abs_tolerance, tolerance * cosine_fnmr)``: such a scorer must not
become a candidate for champion. A target FMR ``f`` is judged only when the held-out impostors
allow at least ``min_false_matches`` false matches there (``f * N_impostor``): below that the
FNMR is decided by a handful of impostor scores, and the row is reported but noted as not
judged. With ``--compare-methods`` every calibration method is measured the same way
(``MethodComparison``); the guard of the chosen method alone decides registration.

Plain numpy. Every outcome is a small frozen class read by attribute; ``to_dict()`` is its
JSON form (``calibration.json``'s ``extra["validation"]``, ``metrics.json``) and
``from_dict`` reads that form back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmag_ray import metrics
from qmag_ray.calibration.result import CalibrationGrid, QMagFaceCalibration
from qmag_ray.fmr import allowed_excess, fmr_key, measurable

#: Below this many false matches an FNMR at FMR is marked as resting on little evidence.
FEW_FALSE_MATCHES = 10
CONVENTION = "FNMR at FMR per ISO/IEC 19795-1 (lowest FNMR with FMR <= target)"
_VERDICT = {True: "PASSED", False: "FAILED", None: "NOT DECIDED"}


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


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3f}"


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class FmrRow:
    """FNMR of cosine and of the QMagFace score at one FMR (None: not measurable there)."""

    fmr: float
    target: bool
    cosine_fnmr: float | None
    qmagface_fnmr: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fmr": self.fmr,
            "target": self.target,
            "cosine_fnmr": self.cosine_fnmr,
            "qmagface_fnmr": self.qmagface_fnmr,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FmrRow:
        return cls(
            float(data["fmr"]), bool(data["target"]), data["cosine_fnmr"], data["qmagface_fnmr"]
        )


@dataclass(frozen=True)
class Guard:
    """The guard's verdict: True passed, False failed, None not decided (nothing judged, or
    no held-out side); one ``PASS``/``FAIL``/``NOTE`` line per target FMR. The tolerances are
    None when no comparison was made."""

    passed: bool | None
    reasons: tuple[str, ...]
    tolerance: float | None = None
    abs_tolerance: float | None = None
    min_false_matches: int | None = None

    @property
    def verdict(self) -> str:
        """``PASSED``, ``FAILED`` or ``NOT DECIDED``."""
        return _VERDICT[self.passed]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "reasons": list(self.reasons)}
        if self.tolerance is not None:
            out.update(
                tolerance=self.tolerance,
                abs_tolerance=self.abs_tolerance,
                min_false_matches=self.min_false_matches,
            )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Guard:
        return cls(
            data.get("passed"),
            tuple(data.get("reasons", ())),
            data.get("tolerance"),
            data.get("abs_tolerance"),
            data.get("min_false_matches"),
        )


@dataclass(frozen=True)
class HeldOutComparison:
    """Cosine against the fitted scorer on held-out pairs: FNMR per FMR, EERs, the guard."""

    n_genuine: int
    n_impostor: int
    rows: tuple[FmrRow, ...]
    cosine_eer: float | None
    qmagface_eer: float | None
    guard: Guard
    convention: str = CONVENTION

    @property
    def target_rows(self) -> tuple[FmrRow, ...]:
        return tuple(r for r in self.rows if r.target)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_genuine": self.n_genuine,
            "n_impostor": self.n_impostor,
            "rows": [r.to_dict() for r in self.rows],
            "eer": {"cosine": self.cosine_eer, "qmagface": self.qmagface_eer},
            "guard": self.guard.to_dict(),
            "convention": self.convention,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeldOutComparison:
        eer = data.get("eer", {})
        return cls(
            int(data["n_genuine"]),
            int(data["n_impostor"]),
            tuple(FmrRow.from_dict(r) for r in data["rows"]),
            eer.get("cosine"),
            eer.get("qmagface"),
            Guard.from_dict(data["guard"]),
            data.get("convention", CONVENTION),
        )

    def table(self, *, targets_only: bool = True) -> str:
        """The console table (target FMRs only unless told otherwise) and the guard."""
        rows = [r for r in self.rows if r.target or not targets_only]
        if not rows:
            return "held-out validation: " + "; ".join(self.guard.reasons)
        n_imp = self.n_impostor

        def evidence(fmr: float) -> str:  # the false matches an FNMR at this FMR rests on
            n = int(math.floor(fmr * n_imp + 1e-9))
            return f"{n}{'*' if n < FEW_FALSE_MATCHES else ' '}"

        lines = [
            f"held-out: {self.n_genuine} genuine / {n_imp} impostor pairs",
            f"{'FNMR % @ FMR':<14}  {'cosine':>9}  {'QMagFace':>9}  {'false matches':>14}",
            "-" * 52,
        ]
        lines += [
            f"{fmr_text(r.fmr):<14}  {_pct(r.cosine_fnmr):>9}  {_pct(r.qmagface_fnmr):>9}  "
            f"{evidence(r.fmr):>14}"
            for r in rows
        ]
        lines.append(f"{'EER %':<14}  {_pct(self.cosine_eer):>9}  {_pct(self.qmagface_eer):>9}")
        if any(math.floor(r.fmr * n_imp + 1e-9) < FEW_FALSE_MATCHES for r in rows):
            lines.append(
                f"* fewer than {FEW_FALSE_MATCHES} false matches: that FNMR is a rough figure"
            )
        lines.append(f"guard (QMagFace not worse than cosine): {self.guard.verdict}")
        lines += [f"  {r}" for r in self.guard.reasons if not r.startswith("PASS")]
        return "\n".join(lines)

    def tracking_metrics(self, prefix: str = "held_out") -> dict[str, float]:
        """FNMR at the target FMRs and both EERs as flat MLflow metrics."""
        out: dict[str, float] = {}
        for row in self.target_rows:
            for name, value in (("cosine", row.cosine_fnmr), ("qmagface", row.qmagface_fnmr)):
                if value is not None:
                    out[f"{prefix}.{name}.fnmr_at_fmr_{fmr_key(row.fmr)}"] = float(value)
        for name, value in (("cosine", self.cosine_eer), ("qmagface", self.qmagface_eer)):
            if value is not None:
                out[f"{prefix}.{name}.eer"] = float(value)
        return out


@dataclass(frozen=True)
class MethodFit:
    alpha: float
    beta: float


@dataclass(frozen=True)
class MethodRow:
    """Cosine's FNMR and each method's at one FMR."""

    fmr: float
    target: bool
    cosine: float | None
    fnmr: Mapping[str, float | None]


@dataclass(frozen=True)
class MethodComparison:
    """Every method fitted on the fit side, measured on the same held-out pairs
    (``--compare-methods``). Without a held-out side only ``fits`` is filled. ``guard`` is
    each method's verdict, for information: only the chosen method's decides registration."""

    chosen: str
    methods: tuple[str, ...]
    fits: Mapping[str, MethodFit]
    n_genuine: int | None = None
    n_impostor: int | None = None
    rows: tuple[MethodRow, ...] = ()
    eer: Mapping[str, float | None] = field(default_factory=dict)
    guard: Mapping[str, bool | None] = field(default_factory=dict)

    @property
    def passing(self) -> list[str]:
        """The methods whose guard passed on the held-out pairs."""
        return [m for m in self.methods if self.guard.get(m)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "chosen": self.chosen,
            "methods": list(self.methods),
            "fits": {m: {"alpha": f.alpha, "beta": f.beta} for m, f in self.fits.items()},
        }
        if not self.rows:
            return {**out, "rows": [], "eer": {}, "guard": {}}
        rows = [
            {"fmr": r.fmr, "target": r.target, "cosine": r.cosine, **dict(r.fnmr)}
            for r in self.rows
        ]
        return {
            **out,
            "n_genuine": self.n_genuine,
            "n_impostor": self.n_impostor,
            "rows": rows,
            "eer": dict(self.eer),
            "guard": dict(self.guard),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodComparison:
        methods = tuple(data["methods"])
        fits = {m: MethodFit(f["alpha"], f["beta"]) for m, f in data["fits"].items()}
        rows = tuple(
            MethodRow(r["fmr"], r["target"], r["cosine"], {m: r[m] for m in methods})
            for r in data.get("rows", [])
        )
        return cls(
            data["chosen"],
            methods,
            fits,
            data.get("n_genuine"),
            data.get("n_impostor"),
            rows,
            dict(data.get("eer", {})),
            dict(data.get("guard", {})),
        )

    def table(self, *, targets_only: bool = True) -> str:
        """The console table: cosine and one column per method."""
        names = ["cosine", *self.methods]

        def cells(values: list[str]) -> str:
            return "  ".join(f"{v:>9}" for v in values)

        lines = [f"methods (fitted on the fit side; chosen: {self.chosen}):"]
        lines.append(f"{'':<14}  {cells(names)}")
        for key in ("alpha", "beta"):
            values = [f"{getattr(self.fits[m], key):.5f}" for m in self.methods]
            lines.append(f"{key:<14}  {cells(['-', *values])}")
        rows = [r for r in self.rows if r.target or not targets_only]
        if not rows:
            lines.append("no held-out side: the methods are not compared on held-out pairs")
            return "\n".join(lines)
        lines.insert(1, f"held-out: {self.n_genuine} genuine / {self.n_impostor} impostor pairs")
        lines.append(f"{'FNMR % @ FMR':<14}  " + "-" * (11 * len(names) - 2))
        lines += [
            f"{fmr_text(r.fmr):<14}  "
            + cells([_pct(r.cosine), *[_pct(r.fnmr[m]) for m in self.methods]])
            for r in rows
        ]
        lines.append(f"{'EER %':<14}  {cells([_pct(self.eer.get(n)) for n in names])}")
        verdicts = {True: "PASSED", False: "FAILED", None: "-"}
        guard = [verdicts[self.guard.get(m)] for m in self.methods]
        lines.append(f"{'guard':<14}  {cells(['', *guard])}")
        return "\n".join(lines)

    def tracking_metrics(self, prefix: str = "held_out") -> dict[str, float]:
        """Every method's alpha, beta and held-out figures as metrics:
        ``methods.<m>.alpha``, ``<prefix>.methods.<m>.fnmr_at_fmr_<key>`` (target FMRs),
        ``<prefix>.methods.<m>.eer`` and ``<prefix>.methods.<m>.guard_passed``."""
        out: dict[str, float] = {}
        for method, fit in self.fits.items():
            out[f"methods.{method}.alpha"] = float(fit.alpha)
            out[f"methods.{method}.beta"] = float(fit.beta)
        for row in self.rows:
            if row.target:
                for method in self.methods:
                    value = row.fnmr[method]
                    if value is not None:
                        key = f"{prefix}.methods.{method}.fnmr_at_fmr_{fmr_key(row.fmr)}"
                        out[key] = float(value)
        for method in self.methods:
            value = self.eer.get(method)
            if value is not None:
                out[f"{prefix}.methods.{method}.eer"] = float(value)
            passed = self.guard.get(method)
            if passed is not None:
                out[f"{prefix}.methods.{method}.guard_passed"] = float(bool(passed))
        return out


@dataclass(frozen=True)
class Validation:
    """The held-out validation of one calibration: how the sides were formed, the comparison
    (None without a held-out side), the guard that decides registration, the method
    comparison (``--compare-methods``) and the notes for the user.

    ``fit_side`` and ``held_out_side`` describe the pairs of each side (JSON-ready, as the
    pair assembly reports them).
    """

    mode: str
    guard: Guard
    fit_side: Mapping[str, Any]
    n_identities_fit: int
    comparison: HeldOutComparison | None = None
    held_out_side: Mapping[str, Any] | None = None
    n_identities_held_out: int | None = None
    identity_disjoint: bool | None = None
    methods: MethodComparison | None = None
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool | None:
        """The guard's verdict (None: not decided or not evaluated)."""
        return self.guard.passed

    @property
    def rows(self) -> tuple[FmrRow, ...]:
        return () if self.comparison is None else self.comparison.rows

    def to_dict(self) -> dict[str, Any]:
        if self.comparison is None:
            out: dict[str, Any] = {"rows": [], "eer": {}, "guard": self.guard.to_dict()}
        else:
            out = self.comparison.to_dict()
        out.update(
            mode=self.mode, fit_side=dict(self.fit_side), n_identities_fit=self.n_identities_fit
        )
        if self.held_out_side is not None:
            out.update(
                held_out_side=dict(self.held_out_side),
                n_identities_held_out=self.n_identities_held_out,
                identity_disjoint=self.identity_disjoint,
            )
        if self.methods is not None:
            out["methods"] = self.methods.to_dict()
        out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Validation:
        """The record as ``to_dict`` wrote it (``calibration.json``'s ``extra["validation"]``)."""
        comparison = HeldOutComparison.from_dict(data) if data.get("rows") else None
        methods = data.get("methods")
        return cls(
            mode=data.get("mode", "none"),
            guard=comparison.guard if comparison else Guard.from_dict(data.get("guard", {})),
            fit_side=data.get("fit_side", {}),
            n_identities_fit=int(data.get("n_identities_fit", 0)),
            comparison=comparison,
            held_out_side=data.get("held_out_side"),
            n_identities_held_out=data.get("n_identities_held_out"),
            identity_disjoint=data.get("identity_disjoint"),
            methods=MethodComparison.from_dict(methods) if methods else None,
            notes=tuple(data.get("notes", ())),
        )

    def table(self) -> str:
        """The held-out table and the guard (or why there is none), then the methods."""
        if self.comparison is None:
            text = "held-out validation: " + "; ".join(self.guard.reasons)
        else:
            text = self.comparison.table()
        if self.methods is not None:
            text += "\n\n" + self.methods.table()
        return text

    def tracking_metrics(self, prefix: str = "held_out") -> dict[str, float]:
        """Held-out FNMR at the target FMRs, EERs, the guard verdict and every method's
        figures as flat MLflow metrics."""
        out = {} if self.comparison is None else self.comparison.tracking_metrics(prefix)
        if self.passed is not None:
            out["guard_passed"] = float(bool(self.passed))
        if self.methods is not None:
            out.update(self.methods.tracking_metrics(prefix))
        return out


# --------------------------------------------------------------------------- measuring


def held_out_comparison(
    cosine: np.ndarray,
    quality: np.ndarray,
    label: np.ndarray,
    calibration: QMagFaceCalibration,
    *,
    tolerance: float = 0.05,
    abs_tolerance: float = 0.0005,
    min_false_matches: int = 10,
) -> HeldOutComparison:
    """FNMR at FMR and EER, cosine vs the fitted scorer, on held-out pairs; with the guard.

    A row's FNMR is None where the held-out impostors cannot measure that FMR.
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
    rows = tuple(
        FmrRow(float(f), any(math.isclose(f, t, rel_tol=1e-6) for t in targets), _num(c), _num(q))
        for f, c, q in zip(fmrs, cos_fnmr, q_fnmr, strict=True)
    )
    guard = check_guard(
        rows,
        n_imp,
        tolerance=tolerance,
        abs_tolerance=abs_tolerance,
        min_false_matches=min_false_matches,
    )
    return HeldOutComparison(
        n_genuine=n_gen,
        n_impostor=n_imp,
        rows=rows,
        cosine_eer=_num(metrics.eer(cosine, y)),
        qmagface_eer=_num(metrics.eer(qmag, y)),
        guard=guard,
    )


def check_guard(
    rows: Sequence[FmrRow],
    n_impostor: int,
    *,
    tolerance: float,
    abs_tolerance: float,
    min_false_matches: int = 10,
) -> Guard:
    """The guard over the target rows of a held-out comparison; see the module docstring."""
    reasons: list[str] = []
    failed = False
    measured = 0
    for row in (r for r in rows if r.target):
        c, q, f = row.cosine_fnmr, row.qmagface_fnmr, row.fmr
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
    return Guard(passed, tuple(reasons), tolerance, abs_tolerance, min_false_matches)


def not_evaluated(reason: str) -> Guard:
    """The guard when there is no held-out side: not decided, saying why."""
    return Guard(None, (f"NOTE: {reason}",))


def method_comparison(
    comparisons: Mapping[str, HeldOutComparison],
    calibrations: Mapping[str, QMagFaceCalibration],
    chosen: str,
) -> MethodComparison:
    """Every method's held-out figures side by side (``--compare-methods``).

    ``comparisons`` maps each method to its ``held_out_comparison`` on the same held-out
    pairs (empty when there is no held-out side).
    """
    methods = tuple(calibrations)
    fits = {m: MethodFit(c.alpha, c.beta) for m, c in calibrations.items()}
    if not all(m in comparisons for m in methods):
        return MethodComparison(chosen, methods, fits)
    first = comparisons[methods[0]]
    rows = []
    for i, row in enumerate(first.rows):
        fnmr: dict[str, float | None] = {}
        for m in methods:
            other = comparisons[m].rows[i]
            if other.fmr != row.fmr:
                raise RuntimeError("held-out comparisons of the methods use different FMRs")
            fnmr[m] = other.qmagface_fnmr
        rows.append(MethodRow(row.fmr, row.target, row.cosine_fnmr, fnmr))
    eer = {"cosine": first.cosine_eer, **{m: comparisons[m].qmagface_eer for m in methods}}
    return MethodComparison(
        chosen,
        methods,
        fits,
        n_genuine=first.n_genuine,
        n_impostor=first.n_impostor,
        rows=tuple(rows),
        eer=eer,
        guard={m: comparisons[m].guard.passed for m in methods},
    )
