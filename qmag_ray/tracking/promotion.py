"""Applying the gate in the registry: judge a challenger version, record why, move ``champion``.

``promote_if_better`` evaluates the current champion (through a callback, so that both sides
are measured on the same held-out protocol), decides with ``gate.decide``, tags the challenger
version with the decision and both sides' figures, and moves the alias.

Linearisable: ``move_gated`` (the primitive every alias move of ``champion`` goes through)
holds the model's promotion lock in the tracking database (``tracking.lock``) from reading the
alias to moving it, so the alias only ever moves to a version that passed the gate against the
version it pointed at at the moment of the move. Of concurrent promotions one goes first; the
others wait for the lock, then decide again against the champion they find (and say so in
their reasons), or stop with a reason when the lock stays busy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmag_ray.tracking import lock as registry_lock
from qmag_ray.tracking.gate import GateConfig, GateDecision, decide
from qmag_ray.tracking.registry import CHAMPION, alias_version, client, move_alias, tag_version

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

    def to_dict(self) -> dict[str, object]:
        return {
            "promoted": self.promoted,
            "reasons": list(self.decision.reasons),
            "champion_before": self.previous_champion,
            "champion_after": self.champion_version,
            "champion_metrics": self.champion_metrics,
        }


Judge = Callable[["ModelVersion | None"], "tuple[GateDecision, dict[str, float] | None]"]


def move_gated(
    model_name: str,
    version: str,
    judge: Judge,
    *,
    alias: str = CHAMPION,
    lock_wait_s: float = registry_lock.DEFAULT_WAIT_S,
    lock_ttl_s: float = registry_lock.DEFAULT_TTL_S,
) -> Promotion:
    """Move ``alias`` to ``version`` if ``judge(current holder)`` says so, linearisably.

    ``judge`` gets the version the alias points at (None: unset) while the promotion lock is
    held and returns ``(decision, champion_metrics)``. The alias moves only if the decision
    promotes and the lock is still this process's; a lock that stays busy for ``lock_wait_s``
    or is lost ends the promotion unpromoted with a ``FAIL`` reason saying why.
    """
    version = str(version)
    try:
        held = registry_lock.acquire(
            model_name, purpose=f"promote version {version}", ttl_s=lock_ttl_s, wait_s=lock_wait_s
        )
    except registry_lock.RegistryLockBusyError as exc:
        current = alias_version(model_name, alias)
        held_version = None if current is None else str(current.version)
        return Promotion(
            GateDecision(False, [f"FAIL: {exc}"]), False, held_version, held_version, None
        )
    with held:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            current = alias_version(model_name, alias)
            current_version = None if current is None else str(current.version)
            if current_version == version:
                decision = GateDecision(False, [f"NOTE: version {version} is already the {alias}"])
                return Promotion(decision, False, version, version, None)
            decision, champion_metrics = judge(current)
            if held.waited_for:
                decision = GateDecision(
                    decision.promote,
                    [
                        *decision.reasons,
                        f"NOTE: waited {held.waited_s:.1f} s for the promotion lock (held by "
                        f"{held.waited_for}); judged against the {alias} found then, version "
                        f"{current_version or 'none'}",
                    ],
                )
            logger.info(
                "gate for %s version %s vs %s %s: %s",
                model_name,
                version,
                alias,
                current_version,
                decision.summary(),
            )
            if not decision.promote:
                return Promotion(
                    decision, False, current_version, current_version, champion_metrics
                )
            try:  # fenced: the lock re-read now, and no younger holder moved the alias
                held.fence()
                registry_lock.check_generation(client(), model_name, held)
            except registry_lock.RegistryLockLostError as exc:
                decision = GateDecision(False, [*decision.reasons, f"FAIL: {exc}"])
                return Promotion(
                    decision, False, current_version, current_version, champion_metrics
                )
            # The expected-holder check also catches a writer that bypassed the lock.
            if move_alias(model_name, alias, version, expected=current_version):
                registry_lock.record_generation(client(), model_name, held)
                return Promotion(decision, True, version, current_version, champion_metrics)
            logger.warning("%s moved outside the lock (attempt %d); deciding again", alias, attempt)
    raise RuntimeError(
        f"the {model_name}@{alias} alias kept moving during {MAX_ATTEMPTS} gate attempts although "
        "the promotion lock was held: something moves it without the lock"
    )


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
    *,
    lock_wait_s: float = registry_lock.DEFAULT_WAIT_S,
) -> Promotion:
    """Judge ``version`` against the current champion and make it champion if the gate passes.

    ``evaluate_champion(model_version)`` returns the champion's metrics on the same held-out
    pairs the challenger's were measured on. The decision goes on the version's tags.
    """
    version = str(version)

    def judge(current: ModelVersion | None) -> tuple[GateDecision, dict[str, float] | None]:
        current_version = None if current is None else str(current.version)
        champion_metrics = None if current is None else dict(evaluate_champion(current))
        decision = decide(challenger_metrics, champion_metrics, gate)
        tag_version(
            model_name,
            version,
            _tags(decision, challenger_metrics, champion_metrics, current_version, gate),
        )
        return decision, champion_metrics

    outcome = move_gated(model_name, version, judge, lock_wait_s=lock_wait_s)
    if not outcome.promoted:
        tag_version(
            model_name,
            version,
            {"gate.promote": "false", "gate.reasons": "\n".join(outcome.decision.reasons)},
        )
    return outcome
