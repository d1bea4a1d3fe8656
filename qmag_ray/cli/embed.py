"""``qmag-ray embed``: MagFace embeddings of face images in storage, written as Parquet."""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated, Any

import typer

from qmag_ray.cli.app import app
from qmag_ray.embedding.config import EmbedConfig

logger = logging.getLogger(__name__)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EmbedConfig)}


def _d(name: str) -> str:
    value = _DEFAULTS[name]
    if isinstance(value, bool):
        value = str(value).lower()
    return f" (default: {value})"


@app.command()
def embed(
    images: Annotated[
        str | None,
        typer.Option(
            help="Folder or URI of the images, laid out as <identity>/<image file> (the first "
            "folder under it is the identity). Use this or --manifest."
        ),
    ] = None,
    manifest: Annotated[
        str | None,
        typer.Option(
            help="CSV or Parquet table of the images: 'path' relative to --images-root, "
            "optional 'identity'. Use this or --images."
        ),
    ] = None,
    images_root: Annotated[
        str | None,
        typer.Option(help="Root the manifest's paths are relative to (default: its folder)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="MagFace checkpoint: a local path or URI (s3://, gs://).")
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Backbone of the checkpoint: iresnet18, iresnet34, iresnet50 or iresnet100."
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(help="Output folder or URI: embeddings/, failures/ and summary.json."),
    ] = None,
    actors: Annotated[
        int | None, typer.Option(min=1, help="Model actors (network copies)." + _d("actors"))
    ] = None,
    gpus_per_actor: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="GPUs per actor; 0 runs on CPU, 0.5 shares a GPU." + _d("gpus_per_actor")
        ),
    ] = None,
    cpus_per_actor: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="CPUs Ray reserves per actor; keep actors x this below the cluster's CPUs so "
            "decoding can run." + _d("cpus_per_actor"),
        ),
    ] = None,
    threads_per_actor: Annotated[
        int | None,
        typer.Option(
            min=1, help="Torch CPU threads per actor (default: --cpus-per-actor rounded up)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Images per forward pass." + _d("batch_size"))
    ] = None,
    read_cpus: Annotated[
        float | None,
        typer.Option(min=0.0, help="CPUs reserved per read-and-decode task." + _d("read_cpus")),
    ] = None,
    mixed_precision: Annotated[
        bool | None,
        typer.Option(
            "--mixed-precision/--no-mixed-precision",
            help="Autocast the forward pass on GPU (ignored on CPU)." + _d("mixed_precision"),
        ),
    ] = None,
    amp_dtype: Annotated[
        str | None,
        typer.Option(help="Mixed-precision type: float16 or bfloat16." + _d("amp_dtype")),
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last",
            help="Channels-last memory format for network and input." + _d("channels_last"),
        ),
    ] = None,
    resize: Annotated[
        bool | None,
        typer.Option(
            "--resize/--no-resize",
            help="Resize images that are not 112x112 (bilinear, logged) instead of failing "
            "them." + _d("resize"),
        ),
    ] = None,
    max_failure_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Fail the run when more than this fraction of images fail (everything is "
            "still written)." + _d("max_failure_fraction"),
        ),
    ] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option(
            "--overwrite/--no-overwrite",
            help="Replace a finished output; without it a finished output is refused and an "
            "interrupted one is resumed." + _d("overwrite"),
        ),
    ] = None,
    wait_for_resources: Annotated[
        bool | None,
        typer.Option(
            "--wait-for-resources/--no-wait-for-resources",
            help="Start even if the cluster lacks the CPUs/GPUs of the actor pool for now (an "
            "autoscaler adds nodes); otherwise such a run is refused at once."
            + _d("wait_for_resources"),
        ),
    ] = None,
    rows_per_part: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="No longer used: the model actors write one part per batch (accepted so that "
            "older configs still run).",
        ),
    ] = None,
    read_attempts: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Attempts per file read before it is recorded as a transient failure (retried "
            "by running the same command again)." + _d("read_attempts"),
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to use (ray://host:10001 or host:6379) (default: RAY_ADDRESS, "
            "else a local cluster)."
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="YAML file with any of these settings (snake_case keys); options given on "
            "the command line override it."
        ),
    ] = None,
) -> None:
    """Embed face images with a MagFace network into Parquet (embeddings/, failures/, summary)."""
    from qmag_ray.config import load_config
    from qmag_ray.embedding import EmbedError, run_embed
    from qmag_ray.lease import LeaseHeldError
    from qmag_ray.runtime import connect_ray

    given: dict[str, Any] = {
        "images": images,
        "manifest": manifest,
        "images_root": images_root,
        "model": model,
        "arch": arch,
        "output": output,
        "actors": actors,
        "gpus_per_actor": gpus_per_actor,
        "cpus_per_actor": cpus_per_actor,
        "threads_per_actor": threads_per_actor,
        "batch_size": batch_size,
        "read_cpus": read_cpus,
        "mixed_precision": mixed_precision,
        "amp_dtype": amp_dtype,
        "channels_last": channels_last,
        "resize": resize,
        "max_failure_fraction": max_failure_fraction,
        "overwrite": overwrite,
        "wait_for_resources": wait_for_resources,
        "rows_per_part": rows_per_part,
        "read_attempts": read_attempts,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        cfg = load_config(EmbedConfig, config, overrides)
        summary = run_embed(cfg, connect=lambda: connect_ray(ray_address))
    except LeaseHeldError as exc:  # another run writes this output: a user error
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except (EmbedError, ValueError) as exc:  # ConfigError, CheckpointError are ValueErrors
        logger.debug("embed failed", exc_info=True)
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(summary.line())
