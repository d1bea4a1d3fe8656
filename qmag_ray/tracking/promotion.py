"""Applying the gate in the registry: judge a challenger version, record why, move ``champion``.

``promote_if_better`` evaluates the current champion (through a callback, so that both sides
are measured on the same held-out protocol), decides with ``gate.decide``, tags the challenger
version with the decision and both sides' figures, and moves the alias with ``move_alias``.
When another process moved the champion in the meantime, it re-decides against the new
champion: the alias only ever points at versions that passed the gate against the champion
they replaced.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmag_ray.tracking.gate import GateConfig, GateDecision, decide
from qmag_ray.tracking.registry import CHAMPION, alias_version, move_alias, tag_version

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class Promotion:
    """What happened: the decision, whether the alias moved, who is champion afterwards."""

    decision: GateDecision
    promoted: bool
    champion_version: str | None
    previous_champion: str | None
    champion_metrics: dict[str, float] | None


def _tags(
    decision: GateDecision,
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    champion_version: str | None,
    gate: GateConfig,
) -> dict[str, str]:
    tags = {
        "gate.promote": str(decision.promote).lower(),
        "gate.reasons": "\n".join(decision.reasons),
        "gate.metric": gate.fnmr_metric,
        "gate.target_fmr": repr(gate.target_fmr),
        "gate.champion_version": champion_version or "none",
        "gate.challenger_metrics": json.dumps(dict(challenger), sort_keys=True),
        "gate.champion_metrics": json.dumps(dict(champion or {}), sort_keys=True),
    }
    if gate.fnmr_metric in challenger:
        tags[f"challenger.{gate.fnmr_metric}"] = repr(challenger[gate.fnmr_metric])
    if champion and gate.fnmr_metric in champion:
        tags[f"champion.{gate.fnmr_metric}"] = repr(champion[gate.fnmr_metric])
    return tags


def promote_if_better(
    model_name: str,
    version: str,
    challenger_metrics: Mapping[str, float],
    evaluate_champion: Callable[[ModelVersion], Mapping[str, float]],
    gate: GateConfig,
) -> Promotion:
    """Judge ``version`` against the current champion and make it champion if the gate passes.

    ``evaluate_champion(model_version)`` returns the champion's metrics on the same held-out
    pairs the challenger's were measured on.
    """
    version = str(version)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        current = alias_version(model_name, CHAMPION)
        current_version = None if current is None else str(current.version)
        if current_version == version:
            decision = GateDecision(False, [f"NOTE: version {version} is already the champion"])
            return Promotion(decision, False, version, version, dict(challenger_metrics))
        champion_metrics = None if current is None else dict(evaluate_champion(current))
        decision = decide(challenger_metrics, champion_metrics, gate)
        tag_version(
            model_name,
            version,
            _tags(decision, challenger_metrics, champion_metrics, current_version, gate),
        )
        logger.info(
            "gate for %s version %s vs champion %s: %s",
            model_name,
            version,
            current_version,
            decision.summary(),
        )
        if not decision.promote:
            return Promotion(decision, False, current_version, current_version, champion_metrics)
        if move_alias(model_name, CHAMPION, version, expected=current_version):
            return Promotion(decision, True, version, current_version, champion_metrics)
        logger.warning("champion moved during the gate (attempt %d); deciding again", attempt)
    raise RuntimeError(
        f"the {model_name}@{CHAMPION} alias kept moving during {MAX_ATTEMPTS} gate attempts; "
        "another recalibration is running concurrently, try again later"
    )
