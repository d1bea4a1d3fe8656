"""``qmag-ray identify``: 1:N search, cosine against QMagFace (CMC rank-k, DIR at FPIR)."""

from __future__ import annotations

import logging
from typing import Any

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.cli.settings_command import GivenSettings, settings_command
from qmag_ray.workflows.config import IdentifyConfig

logger = logging.getLogger(__name__)


@settings_command(app, IdentifyConfig)
def identify(given: GivenSettings, ray_address: opts.RayAddress = None) -> None:
    """Search probes against a gallery: rank-1/5/10/20 and DIR at FPIR, cosine vs QMagFace."""
    from qmag_ray.cli import _support as support

    cfg = given.load()
    support.require_exists(
        embeddings=cfg.embeddings,
        gallery=cfg.gallery,
        probes=cfg.probes,
        calibration=cfg.calibration,
        **{"--quality-file": cfg.quality.file},
    )
    uri = support.prepare_tracking(cfg.tracking.tracking_uri)
    address = support.connect(ray_address)
    from qmag_ray.workflows.identify import run_identification

    outcome = support.guarded("identify", lambda: run_identification(cfg))
    typer.echo("")
    typer.echo(outcome.summary())
    typer.echo("")
    typer.echo(f"results in {outcome.files['metrics.json']}")
    with support.tracking_errors(uri, cfg.output):
        _record(outcome, cfg, address)


def _record(outcome: Any, cfg: Any, address: str) -> None:
    """The identify run in MLflow: settings, rank-k and DIR@FPIR per score, result files."""
    from qmag_ray.cli._support import log_files
    from qmag_ray.tracking.runs import tracked_run

    tags = {
        "qmag_ray.quality_column": outcome.quality.get("column", "quality"),
        "qmag_ray.probes_skipped": str(sum(outcome.counts["skipped"].values())),
    }
    with tracked_run(
        kind="identify", experiment=cfg.tracking.experiment, ray_address=address, tags=tags
    ) as run:
        run.log_params(outcome.params)
        run.log_metrics(outcome.tracking_metrics())
        log_files(run, outcome.files)
        typer.echo(f"mlflow: run {run.run_id} in experiment {cfg.tracking.experiment!r}")
