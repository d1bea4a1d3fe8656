"""``qmag-ray evaluate``: cosine against QMagFace on a benchmark protocol or pair list."""

from __future__ import annotations

import logging

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.cli.settings_command import GivenSettings, settings_command
from qmag_ray.workflows.config import EvaluateConfig

logger = logging.getLogger(__name__)


@settings_command(app, EvaluateConfig)
def evaluate(given: GivenSettings, ray_address: opts.RayAddress = None) -> None:
    """Compare cosine and QMagFace on a pair protocol: metrics.json, plots, a table, MLflow."""
    from qmag_ray.cli import _support as support

    cfg = given.load()
    support.require_exists(
        embeddings=cfg.embeddings,
        pairs=cfg.pairs,
        calibration=cfg.calibration,
        **{"--quality-file": cfg.quality.file, "--group-file": cfg.report.group_file},
        templates=cfg.templates,
    )
    if not cfg.templates:
        support.require_pairs("pairs", cfg.pairs, cfg.protocol)
    uri = support.prepare_tracking(cfg.tracking.tracking_uri)
    address = support.connect(ray_address)
    from qmag_ray.workflows.evaluate import run_evaluation

    outcome = support.guarded("evaluate", lambda: run_evaluation(cfg))
    typer.echo("")
    typer.echo(outcome.summary())
    tags = {
        "qmag_ray.protocol": outcome.pairs["protocol"],
        "qmag_ray.pairs_skipped": str(outcome.pairs["resolve"]["skipped"]),
    }
    support.record_outcome("evaluate", outcome, cfg, address, uri, tags)
