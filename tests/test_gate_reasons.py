"""The gate's decisions and the exact lines it gives for them (read by people and in MLflow).

Every figure is chosen by hand; boundaries (equal to a bound) are on the passing side.
"""

from __future__ import annotations

import pytest

from qmag_ray.tracking.gate import GateConfig, GateDecision, decide, lower_is_better

KEY = "qmagface.fnmr_at_fmr_1e-03"
AUC, EER = "qmagface.auc", "qmagface.eer"


def test_every_check_gives_its_line() -> None:
    gate = GateConfig(
        max_fnmr=0.05,
        max_fnmr_increase=0.001,
        max_fnmr_increase_relative=0.1,
        max_regression={AUC: 0.001, EER: 0.002},
        require_improvement=True,
    )
    champion = {KEY: 0.04, AUC: 0.99, EER: 0.03}
    challenger = {KEY: 0.043, AUC: 0.985, EER: 0.021}
    decision = decide(challenger, champion, gate)
    # allowed increase = max(0.001, 0.1 * 0.04) = 0.004: 0.043 <= 0.044 passes;
    # AUC worsens by 0.005 > 0.001; EER improves (worsening shown as 0).
    assert decision.reasons == [
        f"PASS: {KEY} 0.043 <= max_fnmr 0.05",
        f"PASS: {KEY} challenger 0.043 vs champion 0.04 (allowed increase 0.004)",
        f"FAIL: improvement required, {KEY} did not improve",
        f"FAIL: {AUC} challenger 0.985 vs champion 0.99 (worsening 0.005, allowed 0.001)",
        f"PASS: {EER} challenger 0.021 vs champion 0.03 (worsening 0, allowed 0.002)",
    ]
    assert decision.promote is False
    assert decision.summary() == "keep champion: " + "; ".join(decision.reasons)


def test_a_challenger_passing_everything_is_promoted_with_its_lines() -> None:
    gate = GateConfig(max_fnmr=0.04, max_regression={AUC: 0.25}, require_improvement=True)
    champion = {KEY: 0.05, AUC: 0.75}
    decision = decide({KEY: 0.04, AUC: 0.5}, champion, gate)  # both exactly at their bounds
    assert decision.reasons == [
        f"PASS: {KEY} 0.04 <= max_fnmr 0.04",
        f"PASS: {KEY} challenger 0.04 vs champion 0.05 (allowed increase 0)",
        f"PASS: improvement required, {KEY} improved",
        f"PASS: {AUC} challenger 0.5 vs champion 0.75 (worsening 0.25, allowed 0.25)",
    ]
    assert decision.promote is True
    assert decision.summary().startswith("promote: PASS: ")
    # Just past each bound fails.
    assert not decide({KEY: 0.0401, AUC: 0.5}, champion, gate).promote
    assert not decide({KEY: 0.04, AUC: 0.4999}, champion, gate).promote


def test_fnmr_rise_exactly_at_the_allowed_increase_passes() -> None:
    # 0.25 + max(0.125, 0.25 * 0.25 = 0.0625) = 0.375 (exact in binary).
    gate = GateConfig(max_fnmr_increase=0.125, max_fnmr_increase_relative=0.25)
    assert decide({KEY: 0.375}, {KEY: 0.25}, gate).promote
    assert not decide({KEY: 0.376}, {KEY: 0.25}, gate).promote
    # The relative tolerance wins when it is the larger: 0.5 + max(0.125, 0.5) = 1.0.
    gate = GateConfig(max_fnmr_increase=0.125, max_fnmr_increase_relative=1.0)
    assert decide({KEY: 0.75}, {KEY: 0.5}, gate).promote


def test_missing_values_give_their_lines() -> None:
    gate = GateConfig(max_fnmr=0.5, max_regression={AUC: 0.1})
    decision = decide({KEY: "n/a"}, None, gate)
    assert decision == GateDecision(False, [f"FAIL: challenger has no finite {KEY} (raw: 'n/a')"])
    decision = decide({KEY: 0.75}, None, gate)
    assert decision.reasons == [
        f"FAIL: {KEY} 0.75 > max_fnmr 0.5",
        f"FAIL: challenger has no finite {AUC}",
        "NOTE: no champion yet; the challenger is judged on absolute checks only",
    ]
    assert not decision.promote
    decision = decide({KEY: 0.25, AUC: 0.9}, {KEY: float("nan")}, gate)
    assert decision.reasons == [
        f"PASS: {KEY} 0.25 <= max_fnmr 0.5",
        f"NOTE: champion has no finite {KEY}; FNMR comparison skipped",
        f"NOTE: champion has no finite {AUC}; comparison skipped",
    ]
    assert decision.promote
    # A missing challenger metric fails once, and is not compared again.
    decision = decide({KEY: 0.25}, {KEY: 0.25, AUC: 0.9}, gate)
    assert [r for r in decision.reasons if AUC in r] == [f"FAIL: challenger has no finite {AUC}"]
    assert not decision.promote
    assert decide({KEY: None}, None, GateConfig()).reasons == [
        f"FAIL: challenger has no finite {KEY} (raw: None)"
    ]


def test_direction_of_every_metric_family() -> None:
    for name in ("a.fnmr_x", "b.FMR", "c.EER", "d.error_rate", "train.loss"):
        assert lower_is_better(name), name
    for name in ("qmagface.auc", "qmagface.accuracy_mean", "qmagface.tar_at_far_1e-04"):
        assert not lower_is_better(name), name


def test_metric_key_follows_the_target_fmr_or_the_override() -> None:
    assert GateConfig(target_fmr=1e-2).fnmr_metric == "qmagface.fnmr_at_fmr_1e-02"
    assert GateConfig(metric="cosine.eer").fnmr_metric == "cosine.eer"
    decision = decide({"cosine.eer": 0.25}, {"cosine.eer": 0.125}, GateConfig(metric="cosine.eer"))
    assert (
        not decision.promote
        and "cosine.eer challenger 0.25 vs champion 0.125" in (decision.reasons[0])
    )


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"target_fmr": 0.0}, ["target_fmr", "greater than 0"]),
        ({"target_fmr": 1.0}, ["target_fmr", "less than 1"]),
        ({"max_fnmr_increase": -0.5}, ["max_fnmr_increase", "greater than or equal to 0"]),
        (
            {"max_fnmr_increase_relative": -1.0},
            ["max_fnmr_increase_relative", "greater than or equal to 0"],
        ),
        ({"max_fnmr": 1.5}, ["max_fnmr", "less than or equal to 1"]),
        ({"max_fnmr": -0.25}, ["max_fnmr", "greater than or equal to 0"]),
        ({"max_regression": {AUC: "x"}}, ["max_regression", AUC]),
        ({"max_regression": {AUC: -0.5}}, [f"max_regression.{AUC} must be >= 0, got -0.5"]),
    ],
)
def test_invalid_gate_settings_name_the_key(kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        GateConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_bounds_themselves_are_valid_settings() -> None:
    GateConfig(max_fnmr=0.0, max_fnmr_increase=0.0, max_fnmr_increase_relative=0.0)
    GateConfig(max_fnmr=1.0, max_regression={AUC: 0, EER: 0.5})


def test_a_failed_fnmr_comparison_says_fail() -> None:
    decision = decide({KEY: 0.75}, {KEY: 0.5}, GateConfig())
    assert decision.reasons == [f"FAIL: {KEY} challenger 0.75 vs champion 0.5 (allowed increase 0)"]
    assert not decision.promote


def test_a_missing_metric_does_not_stop_the_next_comparison() -> None:
    gate = GateConfig(max_regression={AUC: 0.125, EER: 0.125})
    # The challenger lacks AUC (fails once), the EER after it is still compared.
    decision = decide({KEY: 0.25, EER: 0.5}, {KEY: 0.25, AUC: 0.75, EER: 0.25}, gate)
    assert decision.reasons[-1] == (
        f"FAIL: {EER} challenger 0.5 vs champion 0.25 (worsening 0.25, allowed 0.125)"
    )
    # The champion lacks AUC (noted), the EER after it is still compared.
    decision = decide({KEY: 0.25, AUC: 0.5, EER: 0.5}, {KEY: 0.25, EER: 0.25}, gate)
    assert decision.reasons[-2:] == [
        f"NOTE: champion has no finite {AUC}; comparison skipped",
        f"FAIL: {EER} challenger 0.5 vs champion 0.25 (worsening 0.25, allowed 0.125)",
    ]
    assert not decision.promote
