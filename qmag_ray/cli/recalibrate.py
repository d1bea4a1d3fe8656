"""``qmag-ray recalibrate``: embed new images, calibrate, gate against the champion, register."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.pairs.protocols import PairProtocol

logger = logging.getLogger(__name__)


@app.command()
def recalibrate(
    config: Annotated[
        str | None,
        typer.Option(help="YAML config (see RecalibrateConfig); command-line options override it."),
    ] = None,
    images: Annotated[
        str | None,
        typer.Option(help="Image prefix <identity>/<file>; only new files are embedded."),
    ] = None,
    embeddings: Annotated[
        str | None, typer.Option(help="Embeddings folder kept between runs (reused, extended).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="MagFace checkpoint URI.")] = None,
    arch: Annotated[str | None, typer.Option(help="Backbone of the checkpoint.")] = None,
    output: Annotated[
        str | None, typer.Option(help="Folder under which each run writes <run-stamp>/.")
    ] = None,
    holdout_embeddings: Annotated[
        str | None, typer.Option(help="Embeddings of the held-out protocol (same model).")
    ] = None,
    holdout_pairs: Annotated[
        str | None, typer.Option(help="Pair list of the held-out protocol.")
    ] = None,
    holdout_protocol: Annotated[
        PairProtocol | None, typer.Option(help="Format of --holdout-pairs (default: guessed).")
    ] = None,
    register_as: Annotated[
        str | None, typer.Option(help="Registered model name (default qmagface).")
    ] = None,
    target_fmr: Annotated[
        float | None, typer.Option(help="Gate: FMR at which FNMR is compared (default 1e-3).")
    ] = None,
    max_fnmr_increase: Annotated[
        float | None,
        typer.Option(help="Gate: FNMR rise over the champion allowed, absolute (default 0)."),
    ] = None,
    tracking_uri: opts.TrackingUri = None,
    experiment: opts.Experiment = None,
    ray_address: opts.RayAddress = None,
) -> None:
    """Scheduled recalibration with a champion/challenger gate (idempotent on unchanged data)."""
    from qmag_ray.cli import _support as support
    from qmag_ray.workflows.recalibrate_config import RecalibrateConfig

    given: dict[str, Any] = {
        "images": images,
        "embeddings": embeddings,
        "model": model,
        "arch": arch,
        "output": output,
        "holdout.embeddings": holdout_embeddings,
        "holdout.pairs": holdout_pairs,
        "holdout.protocol": None if holdout_protocol is None else holdout_protocol.value,
        "register_as": register_as,
        "gate.target_fmr": target_fmr,
        "gate.max_fnmr_increase": max_fnmr_increase,
        "tracking.tracking_uri": tracking_uri,
        "tracking.experiment": experiment,
    }
    cfg = support.load(RecalibrateConfig, config, given)
    assert cfg.holdout is not None
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
