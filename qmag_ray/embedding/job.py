"""``run_embed``: the embedding job from images in storage to Parquet, on Ray Data.

Stages: the driver lists inputs and checks the checkpoint (before any Ray work), then Ray Data
reads and decodes files in CPU tasks, a pool of :class:`EmbedActor` runs the network, and
the driver streams the results into Parquet parts, so memory stays bounded whatever the number
of images. Every input ends up exactly once in ``embeddings/`` or ``failures/``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import numpy as np
import pandas as pd

from qmag_ray import storage
from qmag_ray.embedding.config import EmbedConfig, EmbedError
from qmag_ray.embedding.inputs import Inputs, list_inputs
from qmag_ray.embedding.output import (
    FAILURES_SCHEMA,
    EmbedSummary,
    OutputLayout,
    PartWriter,
    embeddings_schema,
    prepare,
    write_summary,
)
from qmag_ray.embedding.pipeline import Progress, run_pipeline
from qmag_ray.images import PREPROCESSING

logger = logging.getLogger(__name__)


def check_checkpoint(model: str, arch: str) -> tuple[int, str, str]:
    """Fully validate the checkpoint against ``arch`` on the CPU, before any cluster work.

    Returns:
        The embedding size, the checkpoint's sha256 and the architecture's registered name.

    Raises:
        CheckpointError: missing, truncated or unsafe file, or keys that do not fit ``arch``.
        ValueError: ``arch`` is not a registered backbone.
    """
    from qmag_ray.model import canonical_name
    from qmag_ray.model.checkpoint import describe_checkpoint

    info = describe_checkpoint(model, canonical_name(arch))
    return int(info["embedding_size"]), str(info["sha256"]), str(info["arch"])


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine the embeddings."""
    versions = {}
    for dist in ("qmag-ray", "ray", "torch", "numpy", "pyarrow", "pillow", "fsspec"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def run_embed(config: EmbedConfig, *, connect: Callable[[], Any] | None = None) -> EmbedSummary:
    """Embed every input of ``config`` and write the output layout; return the summary.

    Args:
        config: the run's settings.
        connect: called once inputs, checkpoint and output have been checked, just before the
            first Ray work (entry points pass ``lambda: runtime.connect_ray(address)``). Without
            it Ray must already be connected.

    Raises:
        EmbedError: bad inputs or output, a pipeline failure, or more failed images than
            ``max_failure_fraction`` allows (everything is still written, with a summary whose
            status is ``failed``).
        CheckpointError: the checkpoint does not fit the architecture or is unsafe.
    """
    started = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if config.is_onnx:
        from qmag_ray.model.onnx import convention, describe_onnx

        try:
            info = describe_onnx(config.model, convention(config.input_convention or "magface"))
        except ValueError as exc:
            raise EmbedError(str(exc)) from None
        dim, model_sha, arch = int(info["embedding_size"]), str(info["sha256"]), "onnx"
    else:
        dim, model_sha, arch = check_checkpoint(config.model, config.arch)
    inputs = list_inputs(config)
    table = inputs.table
    if inputs.ignored:
        logger.warning(
            "%d files under %s are not images and were not taken as inputs (e.g. %s)",
            len(inputs.ignored),
            storage.redact(inputs.root),
            ", ".join(inputs.ignored[:3]),
        )
    layout = OutputLayout(config.output)
    fingerprint = {
        "model_sha256": model_sha,
        "arch": arch,
        "preprocessing": PREPROCESSING,
        "resize": config.resize,
        "images_root": storage.redact(inputs.root),
    }
    if config.serfiq_settings is not None:  # resuming must not mix parts with and without it
        fingerprint["serfiq"] = config.serfiq_settings.to_dict()
    done = prepare(layout, fingerprint, set(table["path"]), overwrite=config.overwrite)
    todo_mask = ~table["path"].isin(done).to_numpy()
    todo = pd.DataFrame(
        {"index": np.flatnonzero(todo_mask).astype(np.int64), "path": table["path"][todo_mask]}
    )
    logger.info(
        "embedding %d images (%d inputs, %d already done) from %s with %s (%d-d) on %d actor(s)",
        len(todo),
        len(table),
        len(done),
        storage.redact(inputs.root),
        config.arch,
        dim,
        config.actors,
    )
    extra = ("serfiq",) if config.serfiq_settings is not None else ()
    emb_writer = PartWriter(
        layout.embeddings, run_id, embeddings_schema(dim, extra), config.rows_per_part
    )
    fail_writer = PartWriter(layout.failures, run_id, FAILURES_SCHEMA, config.rows_per_part)
    failure_examples: list[dict[str, str]] = []
    progress = Progress(len(todo), config.progress_seconds)
    if len(todo):
        run_pipeline(
            config, todo, inputs, emb_writer, fail_writer, failure_examples, progress, connect
        )
    emb_writer.flush()
    fail_writer.flush()

    wall = time.perf_counter() - started
    busy = wall - progress.connect_seconds  # starting a local Ray is not the job's throughput
    processed = emb_writer.rows + fail_writer.rows
    failed = fail_writer.rows
    fraction = failed / max(len(table), 1)
    status = "failed" if fraction > config.max_failure_fraction else "succeeded"
    summary = EmbedSummary(
        status=status,
        output=storage.redact(config.output),
        run_id=run_id,
        inputs=len(table),
        embedded=len(done) + emb_writer.rows,
        failed=failed,
        skipped_existing=len(done),
        embedded_this_run=emb_writer.rows,
        resized=progress.resized,
        ignored_files=len(inputs.ignored),
        model_uri=storage.redact(config.model),
        model_sha256=model_sha,
        arch=arch,
        embedding_size=dim,
        preprocessing=PREPROCESSING,
        images_per_second=processed / busy if busy > 0 else 0.0,
        wall_seconds=wall,
        timings=progress.timings() if len(todo) else {},
        settings=_settings(config, inputs),
        versions=package_versions(),
        failure_examples=failure_examples,
    )
    if summary.embedded + summary.failed != summary.inputs:
        raise EmbedError(
            f"internal error: {summary.embedded} embedded + {summary.failed} failed != "
            f"{summary.inputs} inputs; the output in {summary.output} is left unfinished"
        )
    write_summary(layout, summary)
    logger.info("%s", summary.line())
    if status == "failed":
        listed = "; ".join(f"{e['path']}: {e['error']}" for e in failure_examples[:5])
        raise EmbedError(
            f"{failed} of {len(table)} inputs failed ({100 * fraction:.2f}% > "
            f"--max-failure-fraction {100 * config.max_failure_fraction:.2f}%), e.g. {listed}; "
            f"all failures are in {storage.redact(layout.failures)}"
        )
    return summary


def _settings(config: EmbedConfig, inputs: Inputs) -> dict[str, Any]:
    return {
        "images": storage.redact(config.images) if config.images else None,
        "manifest": storage.redact(config.manifest) if config.manifest else None,
        "images_root": storage.redact(inputs.root),
        "actors": config.actors,
        "gpus_per_actor": config.gpus_per_actor,
        "cpus_per_actor": config.cpus_per_actor,
        "threads_per_actor": config.torch_threads,
        "batch_size": config.batch_size,
        "read_cpus": config.read_cpus,
        "read_block_rows": config.block_rows,
        "mixed_precision": config.mixed_precision,
        "amp_dtype": config.amp_dtype,
        "channels_last": config.channels_last,
        "resize": config.resize,
        "max_failure_fraction": config.max_failure_fraction,
        "wait_for_resources": config.wait_for_resources,
        "quality": config.quality,
        "input_convention": config.input_convention or "magface",
        # the registry's iResNets are MagFace-trained; an ONNX model's norm is not a quality
        "norm_is_quality": not config.is_onnx,
        "serfiq": None if config.serfiq_settings is None else config.serfiq_settings.to_dict(),
    }
