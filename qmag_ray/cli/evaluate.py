"""``qmag-ray evaluate``: cosine against QMagFace on a benchmark protocol or pair list."""

from __future__ import annotations

import logging
from typing import Any

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
    with support.tracking_errors(uri, cfg.output):
        _record(outcome, cfg, address)


def _record(outcome: Any, cfg: Any, address: str) -> None:
    from qmag_ray.cli._support import log_files
    from qmag_ray.tracking.runs import tracked_run

    tags = {
        "qmag_ray.protocol": outcome.pairs["protocol"],
        "qmag_ray.pairs_skipped": str(outcome.pairs["resolve"]["skipped"]),
    }
    with tracked_run(
        kind="evaluate", experiment=cfg.tracking.experiment, ray_address=address, tags=tags
    ) as run:
        run.log_params(outcome.params)
        run.log_metrics(outcome.tracking_metrics())
        log_files(run, outcome.files)
        typer.echo(f"mlflow: run {run.run_id} in experiment {cfg.tracking.experiment!r}")
