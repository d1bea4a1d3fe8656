"""``qmag-ray calibrate``: fit QMagFace's alpha and beta on Ray, validate, record, register."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.cli.settings_command import GivenSettings, settings_command
from qmag_ray.workflows.config import CalibrateConfig, PairMode

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
    )
    uri = support.prepare_tracking(cfg.tracking.tracking_uri)
    address = support.connect(ray_address)
    from qmag_ray.workflows.calibrate import run_calibration

    outcome = support.guarded("calibrate", lambda: run_calibration(cfg))
    typer.echo("")
    typer.echo(outcome.summary())
    with support.tracking_errors(uri, cfg.output):
        _record(outcome, cfg, address)


def verdict_name(passed: bool | None) -> str:
    """The guard verdict as a tag value."""
    return {True: "passed", False: "failed", None: "not_evaluated"}[passed]


def _record(outcome: Any, cfg: Any, address: str) -> None:
    """Log the run (params, metrics, artifacts, tags) and register the scorer if allowed."""
    from qmag_ray.cli._support import log_files
    from qmag_ray.tracking.registry import register_scorer
    from qmag_ray.tracking.runs import tracked_run

    cal = outcome.calibration
    guard = outcome.validation["guard"]
    verdict = verdict_name(guard["passed"])
    tags = {
        "qmag_ray.guard": verdict,
        "qmag_ray.guard_reasons": "\n".join(guard["reasons"]),
        "qmag_ray.validation": outcome.validation["mode"],
        "qmag_ray.data_fingerprint": cal.fingerprint,
        "qmag_ray.method": cal.method,
    }
    compared = outcome.validation.get("methods")
    if compared and compared.get("guard"):
        tags["qmag_ray.methods_guard"] = ", ".join(
            f"{m}: {verdict_name(compared['guard'][m])}" for m in compared["methods"]
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
        if not cfg.tracking.register:
            typer.echo("registry: not registered (--no-register)")
        elif guard["passed"] is False:
            typer.echo(
                f"registry: NOT registered as a champion candidate: on held-out pairs the fitted "
                f"scorer (method {cal.method}) is worse than plain cosine (guard failed; see the "
                "table above). The run and its calibration.json are recorded for inspection."
            )
            passing = [m for m, ok in (compared or {}).get("guard", {}).items() if ok]
            if passing:
                typer.echo(f"registry: method(s) passing the guard here: {', '.join(passing)}")
            run.set_tags({"qmag_ray.registered": "false (guard failed)"})
        else:
            version = register_scorer(
                cal,
                model_name=cfg.tracking.register_as,
                tags={"qmag_ray.guard": verdict, "qmag_ray.run_id": run.run_id},
            )
            run.set_tags({"qmag_ray.registered": f"{cfg.tracking.register_as}/{version.version}"})
            caveat = "" if guard["passed"] else " (not checked on held-out pairs)"
            typer.echo(f"registry: {cfg.tracking.register_as} version {version.version}{caveat}")
