"""``qmag-ray recalibrate``: embed new images, calibrate, gate against the champion, register."""

from __future__ import annotations

import logging

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.cli.settings_command import GivenSettings, settings_command
from qmag_ray.workflows.recalibrate_config import RecalibrateConfig

logger = logging.getLogger(__name__)


@settings_command(app, RecalibrateConfig)
def recalibrate(given: GivenSettings, ray_address: opts.RayAddress = None) -> None:
    """Scheduled recalibration with a champion/challenger gate (idempotent on unchanged data)."""
    from qmag_ray.cli import _support as support

    cfg = given.load()
    support.require_exists(
        images=cfg.images,
        model=cfg.model,
        holdout_embeddings=cfg.holdout.embeddings,
        holdout_pairs=cfg.holdout.pairs,
    )
    from qmag_ray.workflows.recalibrate_inputs import check_gate_measurable

    support.guarded("recalibrate", lambda: check_gate_measurable(cfg))
    support.prepare_tracking(cfg.tracking.tracking_uri)
    # One recalibration per config at a time (overlapping cron runs): the lease is on the
    # runs folder, taken before anything is embedded into the shared embeddings.
    support.take_output_lease(cfg.output, "recalibrate")
    address = support.connect(ray_address)
    from qmag_ray.embedding.config import EmbedError
    from qmag_ray.workflows.recalibrate import run_recalibration

    try:
        outcome = support.guarded(
            "recalibrate", lambda: run_recalibration(cfg, ray_address=address)
        )
    except EmbedError as exc:
        support.fail(f"recalibrate: embedding new images: {exc}")
    typer.echo("")
    typer.echo(outcome.summary())
    typer.echo(f"mlflow: run {outcome.run_id} in experiment {cfg.tracking.experiment!r}")
