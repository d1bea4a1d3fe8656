"""Scheduled recalibration: embed what is new, calibrate, judge against the champion, register.

``run_recalibration(config)`` is the library function behind ``qmag-ray recalibrate``. The entry
point configures tracking and connects Ray first. One MLflow run records every step:

1. the image prefix is embedded into the kept ``embeddings`` folder: images embedded by earlier
   runs are reused, only new ones go through the network;
2. the inputs' fingerprint (embeddings, model, calibration settings) is compared with the
   versions already registered: unchanged data registers nothing new (idempotent);
3. alpha and beta are fitted (``workflows.calibrate``), the new scorer is evaluated on the
   held-out protocol, registered and given the ``challenger`` alias;
4. the current ``champion`` is evaluated on the same protocol and the gate decides; the alias
   moves only when it passes (``promotion.promote_if_better``, which re-checks the alias right
   before moving it). The decision and both sides' figures go on the run and the version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from qmag_ray import storage
from qmag_ray.config import to_plain
from qmag_ray.tracking import policy
from qmag_ray.tracking.gate import GateDecision
from qmag_ray.tracking.promotion import Promotion, promote_if_better
from qmag_ray.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    alias_version,
    find_versions,
    tag_version,
)
from qmag_ray.tracking.runs import TrackedRun, tracked_run
from qmag_ray.workflows.recalibrate_config import RecalibrateConfig
from qmag_ray.workflows.recalibrate_inputs import (
    RecalibrationError,
    check_gate_measurable,
    check_holdout_model,
    embed_new_images,
    inputs_fingerprint,
    parts_folder,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from qmag_ray.embedding.output import EmbedSummary
    from qmag_ray.workflows.evaluate import EvaluationOutcome

logger = logging.getLogger(__name__)

TAG_INPUTS = "qmag_ray.inputs_fingerprint"


@dataclass(frozen=True)
class RecalibrationOutcome:
    """What a recalibration did."""

    status: str  # "unchanged", "registered" or "not_registered" (guard failed)
    fingerprint: str
    run_id: str
    output: str
    embed: EmbedSummary
    version: str | None = None
    existing_version: str | None = None
    promotion: Promotion | None = None
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the status, the embedding counts, the version and the gate's decision."""
        return {
            "status": self.status,
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
            "output": storage.redact(self.output),
            "embed": self.embed.to_dict()["counts"],
            "version": self.version,
            "existing_version": self.existing_version,
            "promotion": None if self.promotion is None else self.promotion.to_dict(),
            "challenger_metrics": dict(self.challenger_metrics),
            "reason": self.reason,
        }

    def summary(self) -> str:
        e = self.embed
        lines = [
            f"embeddings: {e.embedded_this_run} new image(s) embedded, "
            f"{e.skipped_existing} reused, {e.failed} failed",
            f"inputs fingerprint {self.fingerprint}",
        ]
        if self.status == "unchanged":
            lines.append(
                f"unchanged: version {self.existing_version} was fitted on these inputs; "
                "nothing new registered"
            )
            return "\n".join(lines)
        if self.status == "not_registered":
            lines.append(f"registry: {self.reason}")
            lines.append(f"results in {storage.redact(self.output)}")
            return "\n".join(lines)
        lines.append(f"registered version {self.version} as '{CHALLENGER}'")
        if self.promotion is not None:
            p = self.promotion
            verdict = "PROMOTED to" if p.promoted else "not promoted; champion stays"
            lines.append(f"gate: {verdict} '{CHAMPION}' (version {p.champion_version})")
            lines += [f"  {r}" for r in p.decision.reasons]
        lines.append(f"results in {storage.redact(self.output)}")
        return "\n".join(lines)


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _evaluate(
    cfg: RecalibrateConfig, calibration_uri: str, output: str, use_ray: bool
) -> EvaluationOutcome:
    from qmag_ray.workflows.config import EvaluateConfig
    from qmag_ray.workflows.evaluate import run_evaluation
    from qmag_ray.workflows.recalibrate_config import HoldoutConfig

    holdout = {f.name: getattr(cfg.holdout, f.name) for f in dataclasses.fields(HoldoutConfig)}
    return run_evaluation(
        EvaluateConfig(**holdout, output=output, calibration=calibration_uri), use_ray=use_ray
    )


def _log_files(run: TrackedRun, files: dict[str, str], prefix: str) -> None:
    for name, uri in files.items():
        target = f"{prefix}/{name}"
        if name.endswith(".json"):
            run.log_json(target, json.loads(storage.read_bytes(uri)))
        else:
            run.log_bytes(target, storage.read_bytes(uri))


def _params(cfg: RecalibrateConfig) -> dict[str, Any]:
    data = to_plain(cfg)
    data.pop("tracking")
    return data


def run_recalibration(
    cfg: RecalibrateConfig, *, ray_address: str | None = None, use_ray: bool = True
) -> RecalibrationOutcome:
    """Run one recalibration as ``cfg`` says; see the module docstring for the steps.

    Raises:
        RecalibrationError, WorkflowError, EmbedError, ValueError...: inputs that cannot be
            used (named in the message). The MLflow run then ends FAILED.
    """
    from qmag_ray.embeddings import load_embeddings
    from qmag_ray.workflows.calibrate import run_calibration
    from qmag_ray.workflows.config import CalibrateConfig, CalibrationSettings

    check_gate_measurable(cfg)  # before anything is embedded or fitted
    out = storage.join(cfg.output, _stamp())
    name = cfg.register_as
    with tracked_run(
        kind="recalibrate",
        experiment=cfg.tracking.experiment,
        ray_address=ray_address,
        tags={"qmag_ray.registered_model": name, "qmag_ray.output": storage.redact(out)},
    ) as run:
        run.log_params(_params(cfg))
        summary = embed_new_images(cfg)
        embed = summary
        run.log_metrics({f"embed.{k}": v for k, v in summary.to_dict()["counts"].items()})
        run.log_params({"embedding_model_sha256": summary.model_sha256})
        check_holdout_model(cfg, summary.model_sha256)
        # The parts folder itself: an output folder that is named "embeddings" (as in the job
        # config) would otherwise be taken for the parts folder by load_embeddings.
        parts = parts_folder(cfg)
        table = load_embeddings(parts)
        fingerprint = inputs_fingerprint(cfg, table, summary.model_sha256)
        run.set_tags({TAG_INPUTS: fingerprint})
        existing = find_versions(name, TAG_INPUTS, fingerprint)
        if existing:
            version = str(existing[0].version)
            logger.info("version %s of %s was fitted on these inputs: nothing new", version, name)
            run.set_tags({"qmag_ray.outcome": "unchanged", "qmag_ray.existing_version": version})
            return RecalibrationOutcome(
                "unchanged", fingerprint, run.run_id, out, embed, existing_version=version
            )

        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CalibrationSettings)}
        shared["pair_mode"] = cfg.resolved_pair_mode  # auto: generated from identities
        calibrated = run_calibration(
            CalibrateConfig(
                **shared,
                embeddings=parts,
                output=storage.join(out, "calibration"),
                on_bad=cfg.on_bad,
            ),
            use_ray=use_ray,
        )
        cal = calibrated.calibration
        run.log_metrics(calibrated.tracking_metrics())  # alpha, beta, counts, in-sample...
        _log_files(run, calibrated.files, "calibration")
        challenger_eval = _evaluate(
            cfg,
            calibrated.files["calibration.json"],
            storage.join(out, "holdout", "challenger"),
            use_ray,
        )
        metrics = challenger_eval.tracking_metrics()
        run.log_metrics(metrics, prefix="challenger")
        _log_files(run, challenger_eval.files, "holdout/challenger")

        registration = policy.register(
            cal,
            model_name=name,
            run_id=run.run_id,
            kind="recalibrate",
            guard_passed=calibrated.guard_passed,
            tags={TAG_INPUTS: fingerprint},
        )
        if not registration.registered:
            run.set_tags({"qmag_ray.outcome": "not_registered"})
            return RecalibrationOutcome(
                "not_registered", fingerprint, run.run_id, out, embed, reason=registration.reason
            )
        registration = policy.challenger(registration)
        version = str(registration.version)
        run.set_tags({"qmag_ray.outcome": "registered", "qmag_ray.version": version})

        evaluated: dict[str, dict[str, float]] = {}

        def evaluate_champion(champion: ModelVersion) -> dict[str, float]:
            key = str(champion.version)
            if key not in evaluated:
                evaluated[key] = _evaluate_champion(cfg, champion, out, run, use_ray)
            return evaluated[key]

        promotion = _judge(cfg, version, metrics, evaluate_champion)
        _record_decision(run, promotion, metrics)
        return RecalibrationOutcome(
            "registered",
            fingerprint,
            run.run_id,
            out,
            embed,
            version=version,
            promotion=promotion,
            challenger_metrics=metrics,
        )


def _evaluate_champion(
    cfg: RecalibrateConfig, champion: ModelVersion, out: str, run: TrackedRun, use_ray: bool
) -> dict[str, float]:
    """The champion's calibration, from the registry, on the same held-out protocol."""
    from qmag_ray.tracking.consumer import load_scorer

    version = str(champion.version)
    folder = storage.join(out, "holdout", f"champion-v{version}")
    scorer = load_scorer(f"models:/{cfg.register_as}/{version}")
    uri = storage.join(folder, "calibration.json")
    scorer.calibration.save(uri)
    try:
        evaluation = _evaluate(cfg, uri, folder, use_ray)
    except ValueError as exc:
        raise RecalibrationError(
            f"the champion (version {version}) cannot be evaluated on the held-out protocol: {exc}"
        ) from None
    metrics = evaluation.tracking_metrics()
    run.log_metrics(metrics, prefix=f"champion_v{version}")
    _log_files(run, evaluation.files, f"holdout/champion-v{version}")
    return metrics


def _judge(
    cfg: RecalibrateConfig, version: str, metrics: dict[str, float], evaluate_champion: Any
) -> Promotion:
    """The gate (a version reaching it passed its own held-out guard: see tracking.policy)."""
    name = cfg.register_as
    try:
        return promote_if_better(name, version, metrics, evaluate_champion, cfg.gate)
    except RecalibrationError as exc:
        current = alias_version(name, CHAMPION)
        held = None if current is None else str(current.version)
        decision = GateDecision(False, [f"FAIL: {exc}"])
        tag_version(name, version, {"gate.promote": "false", "gate.reasons": str(exc)})
        return Promotion(decision, False, held, held, None)


def _record_decision(run: TrackedRun, promotion: Promotion, metrics: dict[str, float]) -> None:
    d = promotion.decision
    run.set_tags(
        {
            "gate.promote": str(promotion.promoted).lower(),
            "gate.reasons": "\n".join(d.reasons),
            "qmag_ray.champion_before": promotion.previous_champion or "none",
            "qmag_ray.champion_after": promotion.champion_version or "none",
        }
    )
    run.log_metrics({"gate.promoted": float(promotion.promoted)})
    run.log_json("decision.json", {**promotion.to_dict(), "challenger_metrics": metrics})
