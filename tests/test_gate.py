"""The champion/challenger gate: pure decisions on metric mappings."""

from __future__ import annotations

import math

import pytest

from qmag_ray.tracking.gate import GateConfig, decide, fnmr_metric_name, lower_is_better

KEY = fnmr_metric_name(1e-3)


def test_metric_name_and_direction() -> None:
    assert KEY == "qmagface.fnmr_at_fmr_1e-03"
    assert lower_is_better("cosine.eer") and lower_is_better(KEY)
    assert not lower_is_better("qmagface.auc") and not lower_is_better("qmagface.accuracy_mean")


def test_no_champion_promotes_a_measured_challenger() -> None:
    decision = decide({KEY: 0.05}, None, GateConfig())
    assert decision.promote
    assert any("no champion" in r for r in decision.reasons)


def test_no_champion_still_applies_absolute_checks() -> None:
    gate = GateConfig(max_fnmr=0.01)
    decision = decide({KEY: 0.05}, None, gate)
    assert not decision.promote
    assert any(r.startswith("FAIL") and "max_fnmr" in r for r in decision.reasons)


@pytest.mark.parametrize("value", [None, math.nan, math.inf, "n/a"])
def test_missing_or_non_finite_fnmr_never_promotes(value: object) -> None:
    challenger = {} if value is None else {KEY: value}
    decision = decide(challenger, None, GateConfig())
    assert not decision.promote
    assert KEY in decision.reasons[0]


def test_better_challenger_promoted_worse_one_kept() -> None:
    champion = {KEY: 0.040}
    assert decide({KEY: 0.035}, champion, GateConfig()).promote
    worse = decide({KEY: 0.045}, champion, GateConfig())
    assert not worse.promote
    assert "keep champion" in worse.summary()


def test_absolute_and_relative_tolerances() -> None:
    champion = {KEY: 0.040}
    # 0.043 is 0.003 (7.5%) worse.
    assert not decide({KEY: 0.043}, champion, GateConfig(max_fnmr_increase=0.002)).promote
    assert decide({KEY: 0.043}, champion, GateConfig(max_fnmr_increase=0.003)).promote
    assert not decide({KEY: 0.043}, champion, GateConfig(max_fnmr_increase_relative=0.05)).promote
    assert decide({KEY: 0.043}, champion, GateConfig(max_fnmr_increase_relative=0.10)).promote
    # Either tolerance suffices: the larger one applies.
    gate = GateConfig(max_fnmr_increase=0.001, max_fnmr_increase_relative=0.10)
    assert decide({KEY: 0.043}, champion, gate).promote


def test_require_improvement_refuses_an_equal_challenger() -> None:
    champion = {KEY: 0.04}
    assert decide({KEY: 0.04}, champion, GateConfig()).promote
    assert not decide({KEY: 0.04}, champion, GateConfig(require_improvement=True)).promote


def test_other_metrics_regression_bounds_use_their_direction() -> None:
    gate = GateConfig(max_regression={"qmagface.auc": 0.001, "qmagface.eer": 0.002})
    champion = {KEY: 0.04, "qmagface.auc": 0.990, "qmagface.eer": 0.020}
    good = {KEY: 0.03, "qmagface.auc": 0.9895, "qmagface.eer": 0.021}
    assert decide(good, champion, gate).promote
    auc_drop = {**good, "qmagface.auc": 0.985}
    decision = decide(auc_drop, champion, gate)
    assert not decision.promote
    assert any(r.startswith("FAIL") and "qmagface.auc" in r for r in decision.reasons)
    eer_rise = {**good, "qmagface.eer": 0.025}
    assert not decide(eer_rise, champion, gate).promote
    # Higher AUC / lower EER than the champion is never a regression.
    assert decide({**good, "qmagface.auc": 0.999, "qmagface.eer": 0.001}, champion, gate).promote


def test_challenger_missing_a_gated_metric_fails_champion_missing_one_is_noted() -> None:
    gate = GateConfig(max_regression={"qmagface.auc": 0.0})
    champion = {KEY: 0.04, "qmagface.auc": 0.99}
    assert not decide({KEY: 0.03}, champion, gate).promote
    decision = decide({KEY: 0.03, "qmagface.auc": 0.5}, {KEY: 0.04}, gate)
    assert decision.promote
    assert any(r.startswith("NOTE") and "qmagface.auc" in r for r in decision.reasons)


def test_custom_metric_key_and_validation() -> None:
    gate = GateConfig(target_fmr=1e-4, metric="fnmr_custom")
    assert gate.fnmr_metric == "fnmr_custom"
    assert decide({"fnmr_custom": 0.1}, {"fnmr_custom": 0.2}, gate).promote
    assert GateConfig(target_fmr=1e-4).fnmr_metric == "qmagface.fnmr_at_fmr_1e-04"
    with pytest.raises(ValueError, match="target_fmr"):
        GateConfig(target_fmr=0)
    with pytest.raises(ValueError, match="max_fnmr_increase"):
        GateConfig(max_fnmr_increase=-0.1)
    with pytest.raises(ValueError, match="max_regression.auc"):
        GateConfig(max_regression={"auc": -1})


def test_decision_to_dict_is_its_json_form() -> None:
    gate = GateConfig(target_fmr=1e-3)
    key = gate.fnmr_metric
    decision = decide({key: 0.01}, None, gate)
    data = decision.to_dict()
    assert data == {
        "promote": True,
        "reasons": ["NOTE: no champion yet; the challenger is judged on absolute checks only"],
    }
    data["reasons"].append("x")  # a copy: the decision is not changed through it
    assert len(decision.reasons) == 1
