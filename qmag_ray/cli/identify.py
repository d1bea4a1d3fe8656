"""``qmag-ray identify``: 1:N search, cosine against QMagFace (CMC rank-k, DIR at FPIR)."""

from __future__ import annotations

import logging

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
    tags = {  # the rank-k and DIR@FPIR metrics per score come from the outcome
        "qmag_ray.quality_column": outcome.quality.get("column", "quality"),
        "qmag_ray.probes_skipped": str(sum(outcome.counts["skipped"].values())),
    }
    support.record_outcome("identify", outcome, cfg, address, uri, tags)
