"""``qmag-ray train``: train or fine-tune a backbone with the MagFace loss on Ray Train."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from qmag_ray import storage
from qmag_ray.cli.app import app

logger = logging.getLogger(__name__)


@app.command()
def train(
    data: Annotated[
        str,
        typer.Option(
            help="Manifest (CSV/Parquet with path, identity), a folder with manifest.parquet, "
            "or an <identity>/<image> tree; local or URI."
        ),
    ],
    output: Annotated[str, typer.Option(help="Folder or URI for checkpoints and history.json.")],
    arch: Annotated[str, typer.Option(help="Registered backbone.")] = "iresnet-demo",
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many steps.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per worker and step.")] = 64,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.1,
    weight_decay: Annotated[float, typer.Option()] = 5e-4,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 100,
    num_workers: Annotated[int, typer.Option(min=1, help="Ray Train workers.")] = 1,
    cpus_per_worker: Annotated[
        int, typer.Option(min=1, help="CPUs (torch threads) per worker.")
    ] = 1,
    gpu: Annotated[bool, typer.Option(help="One GPU per worker.")] = False,
    max_failures: Annotated[
        int,
        typer.Option(
            min=0, help="Restarts after a lost worker, each resuming from the last saved epoch."
        ),
    ] = 2,
    init_checkpoint: Annotated[
        str | None, typer.Option(help="Fine-tune from this checkpoint (MagFace layout).")
    ] = None,
    dropout: Annotated[float | None, typer.Option(help="Override the backbone's dropout.")] = None,
    flip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    log_every: Annotated[int, typer.Option(min=1, help="Steps between reported metrics.")] = 20,
    scale: Annotated[float, typer.Option(help="MagFace logit scale s.")] = 64.0,
    lambda_g: Annotated[float, typer.Option(help="Weight of the regulariser g.")] = 35.0,
    l_a: Annotated[float, typer.Option(help="Lower magnitude bound.")] = 10.0,
    u_a: Annotated[float, typer.Option(help="Upper magnitude bound.")] = 110.0,
    l_m: Annotated[float, typer.Option(help="Margin at l_a.")] = 0.45,
    u_m: Annotated[float, typer.Option(help="Margin at u_a.")] = 0.8,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to use (default: RAY_ADDRESS or a local one).")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI: log params and curves there.")
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "qmag-ray-train",
) -> None:
    """Train ARCH with the MagFace loss; checkpoints load like official MagFace ones."""
    from qmag_ray.runtime import connect_ray
    from qmag_ray.training.config import TrainConfig
    from qmag_ray.training.magface import MagFaceParams
    from qmag_ray.training.trainer import train as run_training

    config = TrainConfig(
        data=data,
        output=output,
        arch=arch,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        num_workers=num_workers,
        use_gpu=gpu,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
        init_checkpoint=init_checkpoint,
        dropout=dropout,
        flip=flip,
        seed=seed,
        log_every=log_every,
        magface=MagFaceParams(l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m, lambda_g=lambda_g, scale=scale),
    )
    tracking = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    connect_ray(ray_address)
    result = run_training(config)
    final = result.final
    typer.echo(
        f"checkpoint: {storage.redact(result.checkpoint)} (epoch {result.epoch}); "
        f"last loss {final.get('loss', float('nan')):.3f}, accuracy {final.get('acc', 0.0):.3f}, "
        f"mean norm {final.get('norm', 0.0):.1f}"
        + (f"; resumed {result.resumes} time(s) after a lost worker" if result.resumes else "")
    )
    if tracking:
        from qmag_ray.training.mlflow_log import log_training

        run_id = log_training(result, config, tracking_uri=tracking, experiment=experiment)
        typer.echo(f"MLflow run {run_id} in experiment {experiment!r}")
