"""``qmag-ray synth``: write a synthetic face set with controlled degradation."""

from __future__ import annotations

import logging
import os
import time
from enum import Enum
from typing import Annotated

import typer

from qmag_ray import storage
from qmag_ray.cli.app import app

logger = logging.getLogger(__name__)


class ImageFormat(str, Enum):
    JPG = "jpg"
    PNG = "png"


@app.command()
def synth(
    output: Annotated[str, typer.Option(help="Folder or URI (s3://...) to write the set to.")],
    identities: Annotated[int, typer.Option(min=1, help="Number of identities.")] = 200,
    images_per_identity: Annotated[int, typer.Option(min=1, help="Images per identity.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same images.")] = 0,
    first_identity: Annotated[
        int, typer.Option(min=0, help="Number of the first identity (disjoint sets from one seed).")
    ] = 0,
    max_degradation: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Degradation levels are drawn in [0, this].")
    ] = 1.0,
    image_format: Annotated[ImageFormat, typer.Option(help="Image files: jpg or png.")] = (
        ImageFormat.JPG
    ),
    workers: Annotated[
        int, typer.Option(min=0, help="Generator processes (0: one per CPU core).")
    ] = 0,
) -> None:
    """Generate N identities x M face-like images and their manifest.parquet."""
    from qmag_ray.synth import SynthSpec, write_dataset

    spec = SynthSpec(
        identities=identities,
        images_per_identity=images_per_identity,
        seed=seed,
        first_identity=first_identity,
        max_degradation=max_degradation,
        image_format=image_format.value,
    )
    n_workers = workers or min(os.cpu_count() or 1, 8)
    started = time.perf_counter()
    manifest = write_dataset(output, spec, workers=n_workers)
    elapsed = time.perf_counter() - started
    typer.echo(
        f"wrote {len(manifest)} images of {identities} identities and "
        f"{storage.join(storage.redact(output), 'manifest.parquet')} in {elapsed:.1f} s "
        f"({len(manifest) / max(elapsed, 1e-9):.0f} images/s)"
    )
