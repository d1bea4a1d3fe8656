"""The champion/challenger promotion gate: a pure decision on two flat metric mappings.

A challenger is promoted when it passes the absolute checks (its FNMR at the target FMR is
measured, finite and under ``max_fnmr`` if set) and, when there is a champion, it is not worse
than the champion beyond the configured tolerances: FNMR at the target FMR may rise by at most
``max(max_fnmr_increase, max_fnmr_increase_relative * champion_fnmr)``, and every metric in
``max_regression`` may worsen by at most its bound. Whether lower or higher is better is read
from the metric name (``lower_is_better``). Every check adds a line to ``reasons``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from qmag_ray.config import Settings, option, settings
from qmag_ray.fmr import allowed_excess, fmr_key

LOWER_IS_BETTER = ("fnmr", "fmr", "eer", "error", "loss")


def lower_is_better(metric: str) -> bool:
    """FNMR, FMR, EER and error-like metrics improve downwards; AUC, accuracy upwards."""
    name = metric.lower()
    return any(marker in name for marker in LOWER_IS_BETTER)


def fnmr_metric_name(fmr: float, method: str = "qmagface") -> str:
    """The flat metric key of FNMR at ``fmr`` for ``method`` (``qmagface.fnmr_at_fmr_1e-03``)."""
    return f"{method}.fnmr_at_fmr_{fmr_key(fmr)}"


@settings
class GateConfig(Settings):
    """When a challenger may replace the champion."""

    target_fmr: float = option(
        1e-3, "Gate: the FMR at which challenger and champion FNMR are compared.", gt=0, lt=1
    )
    metric: str = option(
        "",
        "Gate: the FNMR metric key (default: qmagface.fnmr_at_fmr_<target FMR>).",
        flag="gate-metric",
    )
    max_fnmr: float | None = option(
        None, "Gate: absolute ceiling for the challenger's FNMR (a fraction).", ge=0, le=1
    )
    max_fnmr_increase: float = option(
        0.0, "Gate: FNMR rise over the champion allowed, absolute (0.001 = 0.1 point).", ge=0
    )
    max_fnmr_increase_relative: float = option(
        0.0, "Gate: FNMR rise over the champion allowed, relative (0.05 = 5%).", ge=0
    )
    max_regression: dict[str, float] = option(
        {},
        "Gate: other metrics and the largest worsening each may show, METRIC=BOUND (repeatable).",
    )
    require_improvement: bool = option(
        False, "Gate: the challenger's FNMR must be strictly lower than the champion's."
    )

    def check(self) -> None:
        for key, bound in self.max_regression.items():
            if not bound >= 0:
                raise ValueError(
                    f"`max_regression` bound max_regression.{key} must be >= 0, got {bound!r}"
                )

    @property
    def fnmr_metric(self) -> str:
        return self.metric or fnmr_metric_name(self.target_fmr)


@dataclass(frozen=True)
class GateDecision:
    """The verdict and one human-readable line per check (``PASS``/``FAIL``/``NOTE``)."""

    promote: bool
    reasons: list[str]

    def to_dict(self) -> dict[str, object]:
        return {"promote": self.promote, "reasons": list(self.reasons)}

    def summary(self) -> str:
        verdict = "promote" if self.promote else "keep champion"
        return f"{verdict}: " + "; ".join(self.reasons)


def _value(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def decide(
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    gate: GateConfig,
) -> GateDecision:
    """Decide whether ``challenger`` replaces ``champion`` (None: there is no champion yet)."""
    reasons: list[str] = []
    ok = True
    key = gate.fnmr_metric
    fnmr = _value(challenger, key)
    if fnmr is None:
        reasons.append(f"FAIL: challenger has no finite {key} (raw: {challenger.get(key)!r})")
        return GateDecision(False, reasons)
    if gate.max_fnmr is not None:
        passed = fnmr <= gate.max_fnmr
        ok &= passed
        reasons.append(
            f"{'PASS' if passed else 'FAIL'}: {key} {fnmr:.6g} "
            f"{'<=' if passed else '>'} max_fnmr {gate.max_fnmr:.6g}"
        )
    for name in gate.max_regression:
        if _value(challenger, name) is None:
            ok = False
            reasons.append(f"FAIL: challenger has no finite {name}")

    if champion is None:
        reasons.append("NOTE: no champion yet; the challenger is judged on absolute checks only")
        return GateDecision(ok, reasons)

    base = _value(champion, key)
    if base is None:
        reasons.append(f"NOTE: champion has no finite {key}; FNMR comparison skipped")
    else:
        allowed = allowed_excess(base, gate.max_fnmr_increase, gate.max_fnmr_increase_relative)
        passed = fnmr <= base + allowed
        ok &= passed
        reasons.append(
            f"{'PASS' if passed else 'FAIL'}: {key} challenger {fnmr:.6g} vs champion "
            f"{base:.6g} (allowed increase {allowed:.6g})"
        )
        if gate.require_improvement:
            better = fnmr < base
            ok &= better
            reasons.append(
                f"{'PASS' if better else 'FAIL'}: improvement required, "
                f"{key} {'improved' if better else 'did not improve'}"
            )
    for name, bound in gate.max_regression.items():
        new, old = _value(challenger, name), _value(champion, name)
        if new is None:
            continue  # already failed above
        if old is None:
            reasons.append(f"NOTE: champion has no finite {name}; comparison skipped")
            continue
        worsening = new - old if lower_is_better(name) else old - new
        passed = worsening <= bound
        ok &= passed
        reasons.append(
            f"{'PASS' if passed else 'FAIL'}: {name} challenger {new:.6g} vs champion {old:.6g} "
            f"(worsening {max(worsening, 0.0):.6g}, allowed {bound:.6g})"
        )
    return GateDecision(bool(ok), reasons)
