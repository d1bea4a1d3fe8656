"""``qmag-ray identify``: 1:N search, cosine against QMagFace (CMC rank-k, DIR at FPIR)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.pairs.resolve import Match, Policy
from qmag_ray.search.sets import Layout

logger = logging.getLogger(__name__)


@app.command()
def identify(
    embeddings: Annotated[
        str | None,
        typer.Option(help="Embeddings: an embed job's output folder, its embeddings/ or Parquet."),
    ] = None,
    gallery: Annotated[
        str | None,
        typer.Option(
            help="Gallery list: CSV path, identity (empty identity = distractor), or a template "
            "list path, template[, media], identity (IJB 1:N CSVs too)."
        ),
    ] = None,
    probes: Annotated[
        str | None,
        typer.Option(help="Probe list: CSV path, identity[, subset] (or a template list)."),
    ] = None,
    layout: Annotated[
        Layout | None,
        typer.Option(help="Find gallery and probes in the embeddings' paths: scface or tinyface."),
    ] = None,
    output: Annotated[
        str | None, typer.Option(help="Folder or URI for metrics.json and candidates.parquet.")
    ] = None,
    calibration: Annotated[
        str | None, typer.Option(help="calibration.json of a calibrate run (or --alpha/--beta).")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="QMagFace alpha (with --beta).")] = None,
    beta: Annotated[float | None, typer.Option(help="QMagFace beta (with --alpha).")] = None,
    prefix: Annotated[
        str | None, typer.Option(help="Prefix joined onto list paths to form embedding paths.")
    ] = None,
    match: Annotated[
        Match | None, typer.Option(help="Match list paths exactly or by path suffix.")
    ] = None,
    pooling: opts.PoolingRule = None,
    shards: Annotated[
        int | None, typer.Option(min=0, help="Gallery shards (Ray tasks); 0: two per CPU.")
    ] = None,
    on_missing: opts.OnMissing = None,
    on_unlabelled: Annotated[
        Policy | None,
        typer.Option(help="Probes without an identity: error (default) or skip (counted)."),
    ] = None,
    ray_address: opts.RayAddress = None,
    config: Annotated[
        str | None,
        typer.Option(help="YAML config (see IdentifyConfig); command-line options override it."),
    ] = None,
) -> None:
    """Search probes against a gallery: rank-1/5/10/20 and DIR at FPIR, cosine vs QMagFace."""
    from qmag_ray.cli import _support as support
    from qmag_ray.workflows.config import IdentifyConfig

    given: dict[str, Any] = {
        "embeddings": embeddings,
        "gallery": gallery,
        "probes": probes,
        "layout": layout,
        "output": output,
        "calibration": calibration,
        "alpha": alpha,
        "beta": beta,
        "prefix": prefix,
        "match": match,
        "pooling": pooling,
        "shards": shards,
        "on_missing": on_missing,
        "on_unlabelled": on_unlabelled,
    }
    plain = {k: (v.value if hasattr(v, "value") else v) for k, v in given.items()}
    cfg = support.load(IdentifyConfig, config, plain)
    support.require_exists(
        embeddings=cfg.embeddings,
        gallery=cfg.gallery,
        probes=cfg.probes,
        calibration=cfg.calibration,
    )
    support.connect(ray_address)
    from qmag_ray.workflows.identify import run_identification

    outcome = support.guarded("identify", lambda: run_identification(cfg))
    typer.echo("")
    typer.echo(outcome.summary())
    typer.echo("")
    typer.echo(f"results in {outcome.files['metrics.json']}")
