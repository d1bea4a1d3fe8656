"""``qmag-ray calibrate``: fit QMagFace's alpha and beta on Ray, validate, record, register."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.cli.settings_command import GivenSettings, settings_command
from qmag_ray.workflows.config import CalibrateConfig, PairMode

if TYPE_CHECKING:
    from qmag_ray.workflows.calibrate import CalibrationOutcome

logger = logging.getLogger(__name__)


def _pair_mode(generate_pairs: bool, exhaustive: bool) -> str | None:
    if generate_pairs and exhaustive:
        from qmag_ray.cli._support import fail

        fail("give at most one of --generate-pairs and --exhaustive")
    if generate_pairs:
        return PairMode.GENERATE.value
    return PairMode.EXHAUSTIVE.value if exhaustive else None


@settings_command(app, CalibrateConfig)
def calibrate(
    given: GivenSettings,
    generate_pairs: Annotated[
        bool,
        typer.Option(help="Shorthand for --pair-mode generate (the default without --pairs)."),
    ] = False,
    exhaustive: Annotated[
        bool, typer.Option(help="Shorthand for --pair-mode exhaustive: every pair, block-wise.")
    ] = False,
    ray_address: opts.RayAddress = None,
) -> None:
    """Fit alpha and beta on Ray, check them on held-out identities, record and register."""
    from qmag_ray.cli import _support as support

    cfg = given.load({"pair_mode": _pair_mode(generate_pairs, exhaustive)})
    support.require_exists(
        embeddings=cfg.embeddings,
        pairs=cfg.pairs,
        validation_pairs=cfg.validation.pairs,
        templates=cfg.templates,
        validation_embeddings=cfg.validation.embeddings,
        **{"--quality-file": cfg.quality.file},
    )
    if not cfg.templates:  # template pairs name templates: checked once they are pooled
        support.require_pairs("pairs", cfg.pairs, cfg.protocol)
    support.require_pairs("validation_pairs", cfg.validation.pairs, cfg.validation.protocol)
    uri = support.prepare_tracking(cfg.tracking.tracking_uri)
    held = support.take_output_lease(cfg.output, "calibrate")
    address = support.connect(ray_address)
    from qmag_ray.workflows.calibrate import run_calibration

    outcome = support.guarded("calibrate", lambda: run_calibration(cfg))
    typer.echo("")
    typer.echo(outcome.summary())
    support.still_held(held)
    with support.tracking_errors(uri, cfg.output):
        _record(outcome, cfg, address)


def _record(outcome: CalibrationOutcome, cfg: CalibrateConfig, address: str) -> None:
    """Log the run (params, metrics, artifacts, tags) and register the scorer if allowed."""
    from qmag_ray.cli._support import log_files
    from qmag_ray.tracking import policy
    from qmag_ray.tracking.runs import tracked_run

    cal = outcome.calibration
    validation = outcome.validation
    tags = {
        "qmag_ray.guard": policy.guard_verdict(outcome.guard_passed),
        "qmag_ray.guard_reasons": "\n".join(validation.guard.reasons),
        "qmag_ray.validation": validation.mode,
        "qmag_ray.data_fingerprint": cal.fingerprint,
        "qmag_ray.method": cal.method,
    }
    if cal.extra.get("grid_note"):  # the raised grid floor (also in calibration.json)
        tags["qmag_ray.grid_note"] = cal.extra["grid_note"]
    compared = validation.methods
    if compared is not None and compared.guard:
        tags["qmag_ray.methods_guard"] = ", ".join(
            f"{m}: {policy.guard_verdict(compared.guard[m])}" for m in compared.methods
        )
    with tracked_run(
        kind="calibrate", experiment=cfg.tracking.experiment, ray_address=address, tags=tags
    ) as run:
        params = {k: v for k, v in outcome.params.items() if k not in ("grid", "method")}
        run.log_params(params)
        run.log_calibration(cal)  # calibration.json, grid_table.csv, grid params, alpha, beta
        done = {"alpha", "beta", "n_genuine", "n_impostor"}
        run.log_metrics({k: v for k, v in outcome.tracking_metrics().items() if k not in done})
        log_files(run, outcome.files, skip=("calibration.json", "grid_table.csv"))
        typer.echo(f"mlflow: run {run.run_id} in experiment {cfg.tracking.experiment!r}")
        registration = policy.register(
            cal,
            model_name=cfg.tracking.register_as,
            run_id=run.run_id,
            kind="calibrate",
            guard_passed=outcome.guard_passed,
            enabled=cfg.tracking.register,
        )
        registration = policy.calibrate_aliases(
            registration, outcome.guard_passed, cfg.tracking.alias
        )
        for line in registration.lines():
            typer.echo(line)
        if not registration.registered and outcome.guard_passed is False:
            passing = [] if compared is None else compared.passing
            if passing:
                typer.echo(f"registry: method(s) passing the guard here: {', '.join(passing)}")
        run.set_tags(
            {
                "qmag_ray.registered": (
                    f"{registration.model_name}/{registration.version}"
                    if registration.registered
                    else f"false ({registration.reason.split(':')[0]})"
                ),
                "qmag_ray.aliases": ", ".join(registration.aliases) or "none",
            }
        )
