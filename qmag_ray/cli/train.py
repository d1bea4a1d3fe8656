"""``qmag-ray train``: train or fine-tune a backbone with the MagFace loss on Ray Train."""

from __future__ import annotations

import logging
import os

import typer

from qmag_ray import storage
from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.cli.settings_command import GivenSettings, settings_command
from qmag_ray.training.config import TrainConfig

logger = logging.getLogger(__name__)


@settings_command(app, TrainConfig)
def train(given: GivenSettings, ray_address: opts.RayAddress = None) -> None:
    """Train ARCH with the MagFace loss; checkpoints load like official MagFace ones."""
    from qmag_ray.cli._support import guarded
    from qmag_ray.runtime import connect_ray
    from qmag_ray.training.trainer import train as run_training

    config = given.load()
    tracking = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    guarded("Ray", lambda: connect_ray(ray_address))
    from qmag_ray.cli.console import verbose

    level = "INFO" if verbose() else "WARNING"  # Ray Train's own lines: --verbose
    result = guarded("train", lambda: run_training(config, ray_train_log_level=level))
    final = result.final
    typer.echo(
        f"checkpoint: {storage.redact(result.checkpoint)} (epoch {result.epoch}); "
        f"last loss {final.get('loss', float('nan')):.3f}, accuracy {final.get('acc', 0.0):.3f}, "
        f"mean norm {final.get('norm', 0.0):.1f}"
        + (f"; resumed {result.resumes} time(s) after a lost worker" if result.resumes else "")
    )
    if tracking:
        from qmag_ray.training.mlflow_log import log_training

        experiment = config.tracking.experiment
        run_id = log_training(result, config, tracking_uri=tracking, experiment=experiment)
        typer.echo(f"MLflow run {run_id} in experiment {experiment!r}")
