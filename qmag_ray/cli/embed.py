"""``qmag-ray embed``: MagFace embeddings of face images in storage, written as Parquet."""

from __future__ import annotations

import logging

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.cli.settings_command import GivenSettings, settings_command
from qmag_ray.embedding.config import EmbedConfig

logger = logging.getLogger(__name__)


@settings_command(app, EmbedConfig)
def embed(given: GivenSettings, ray_address: opts.RayAddress = None) -> None:
    """Embed face images with a MagFace network into Parquet (embeddings/, failures/, summary)."""
    from qmag_ray.cli._support import RUN_FAILED_EXIT, USER_ERROR_EXIT, fail
    from qmag_ray.embedding import EmbedError, run_embed
    from qmag_ray.embedding.config import EmbedInputError
    from qmag_ray.lease import LeaseHeldError
    from qmag_ray.runtime import connect_ray

    cfg = given.load()
    from qmag_ray.cli import _support as support

    # Before Ray starts: inputs exist and can be read (S3 credentials, bucket), model exists.
    support.require_exists(
        images=cfg.images, manifest=cfg.manifest, images_root=cfg.images_root, model=cfg.model
    )
    support.require_writable(output=cfg.output)
    try:
        summary = run_embed(cfg, connect=lambda: connect_ray(ray_address))
    except (ValueError, FileNotFoundError, EmbedInputError, LeaseHeldError) as exc:
        # CheckpointError, refused inputs or output, another run writing this output
        logger.debug("embed refused", exc_info=True)
        fail(str(exc), USER_ERROR_EXIT)
    except EmbedError as exc:  # started, then failed (too many failures, lost results)
        logger.debug("embed failed", exc_info=True)
        fail(str(exc), RUN_FAILED_EXIT)
    typer.echo(summary.line())
