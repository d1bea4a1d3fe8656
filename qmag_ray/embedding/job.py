"""``run_embed``: the embedding job from images in storage to Parquet, on Ray Data.

Stages: the driver lists inputs and checks the checkpoint (before any Ray work), then Ray Data
reads and decodes files in small CPU tasks, a pool of :class:`EmbedActor` runs the network, and
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
from qmag_ray.embedding.actor import EmbedActor
from qmag_ray.embedding.config import EmbedConfig, EmbedError
from qmag_ray.embedding.inputs import Inputs, list_inputs, read_and_decode
from qmag_ray.embedding.output import (
    FAILURES_SCHEMA,
    EmbedSummary,
    OutputLayout,
    PartWriter,
    embedding_batch,
    embeddings_schema,
    failure_batch,
    prepare,
    write_summary,
)
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


def _check_resources(config: EmbedConfig) -> None:
    """Refuse an actor pool the cluster cannot host next to the read tasks (or warn, when
    ``wait_for_resources`` says an autoscaler will add nodes)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    problems = []
    need_gpus = config.actors * config.gpus_per_actor
    if need_gpus > gpus:
        problems.append(
            f"{config.actors} actor(s) x {config.gpus_per_actor:g} GPU need {need_gpus:g} GPUs "
            f"but the Ray cluster has {gpus:g}; use --gpus-per-actor 0 to run on CPU"
        )
    need_cpus = config.actors * config.cpus_per_actor + config.read_cpus
    if need_cpus > cpus:
        problems.append(
            f"{config.actors} actor(s) x {config.cpus_per_actor:g} CPU plus {config.read_cpus:g} "
            f"CPU for reading need {need_cpus:g} CPUs but the Ray cluster has {cpus:g}; lower "
            "--actors or --cpus-per-actor so that decoding can run next to the actors"
        )
    if not problems:
        return
    if config.wait_for_resources:
        for problem in problems:
            logger.warning("%s; waiting for the autoscaler (--wait-for-resources)", problem)
        return
    raise EmbedError(
        "; ".join(problems)
        + " (on an autoscaling cluster pass --wait-for-resources to wait for new nodes)"
    )


def _dataset(config: EmbedConfig, todo: pd.DataFrame, root: str):  # noqa: ANN202 - ray Dataset
    import ray

    step = config.block_rows
    blocks = [todo.iloc[i : i + step].reset_index(drop=True) for i in range(0, len(todo), step)]
    ds = ray.data.from_pandas(blocks)
    ds = ds.map_batches(
        read_and_decode,
        fn_kwargs={"root": root, "resize": config.resize},
        batch_size=None,
        batch_format="numpy",
        num_cpus=config.read_cpus,
    )
    return ds.map_batches(
        EmbedActor,
        fn_constructor_args=(config.model, config.arch),
        fn_constructor_kwargs={
            "use_gpu": config.gpus_per_actor > 0,
            "threads": config.torch_threads,
            "mixed_precision": config.mixed_precision,
            "amp_dtype": config.amp_dtype,
            "channels_last": config.channels_last,
        },
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
        batch_size=config.batch_size,
        batch_format="numpy",
    )


class _Progress:
    """Counts results, logs a progress line every ``interval`` seconds, times the pipeline."""

    def __init__(self, total: int, interval: float) -> None:
        self.total, self.interval = total, interval
        self.begin()
        self.first: float | None = None
        self.first_images = 0
        self.connect_seconds = 0.0
        self.embedded = self.failed = self.logged = 0
        self.resized = 0

    def begin(self) -> None:
        """Start the clock (when the pipeline starts)."""
        self.start = self.last = time.perf_counter()

    def update(self, embedded: int, failed: int, *, force: bool = False) -> None:
        now = time.perf_counter()
        if self.first is None and embedded + failed:
            self.first, self.first_images = now, embedded + failed
        self.embedded += embedded
        self.failed += failed
        done = self.embedded + self.failed
        if (force and done != self.logged) or now - self.last >= self.interval:
            self.last, self.logged = now, done
            logger.info(
                "embedded %d, failed %d, %d/%d done (%.1f%%), %.1f images/s",
                self.embedded,
                self.failed,
                done,
                self.total,
                100.0 * done / max(self.total, 1),
                done / max(now - self.start, 1e-9),
            )

    def timings(self) -> dict[str, float]:
        """Seconds from the pipeline's start to its first result (of ``first_result_images``
        images) and to its end."""
        end = time.perf_counter()
        first = self.first if self.first is not None else end
        return {
            "connect_seconds": self.connect_seconds,
            "first_result_seconds": first - self.start,
            "first_result_images": float(self.first_images),
            "pipeline_seconds": end - self.start,
        }


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
    emb_writer = PartWriter(layout.embeddings, run_id, embeddings_schema(dim), config.rows_per_part)
    fail_writer = PartWriter(layout.failures, run_id, FAILURES_SCHEMA, config.rows_per_part)
    failure_examples: list[dict[str, str]] = []
    progress = _Progress(len(todo), config.progress_seconds)
    if len(todo):
        _run_pipeline(
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
    }


def _run_pipeline(
    config: EmbedConfig,
    todo: pd.DataFrame,
    inputs: Inputs,
    emb_writer: PartWriter,
    fail_writer: PartWriter,
    failure_examples: list[dict[str, str]],
    progress: _Progress,
    connect: Callable[[], Any] | None,
) -> None:
    """Run the Ray Data pipeline over ``todo`` and stream its results into the writers."""
    import ray

    if connect is not None:
        started = time.perf_counter()
        connect()
        progress.connect_seconds = time.perf_counter() - started
    if not ray.is_initialized():
        raise EmbedError("Ray is not connected: call qmag_ray.runtime.connect_ray() first")
    _check_resources(config)
    paths = inputs.table["path"].to_numpy(dtype=object)
    identities = inputs.table["identity"].to_numpy(dtype=object)
    seen = np.zeros(len(paths), dtype=bool)
    progress.begin()
    ds = _dataset(config, todo, inputs.root)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            index = np.asarray(batch["index"], dtype=np.int64)
            errors = np.asarray(batch["error"], dtype=object)
            emb = np.asarray(batch["embedding"], dtype=np.float32)
            fresh = ~seen[index]
            if not fresh.all():
                logger.warning("dropping %d rows the pipeline delivered twice", (~fresh).sum())
                index, errors, emb = index[fresh], errors[fresh], emb[fresh]
            seen[index] = True
            ok = errors == ""
            finite = np.isfinite(emb).all(axis=1)
            if (ok & ~finite).any():
                errors = errors.copy()
                errors[ok & ~finite] = "embedding is not finite (NaN or inf): check the checkpoint"
                ok &= finite
            emb_writer.add(embedding_batch(paths[index[ok]], identities[index[ok]], emb[ok]))
            bad = index[~ok]
            fail_writer.add(failure_batch(paths[bad], errors[~ok]))
            for path, error in zip(paths[bad][:3], errors[~ok][:3], strict=False):
                if len(failure_examples) < 20:
                    failure_examples.append({"path": str(path), "error": str(error)})
            resized_here = np.asarray(batch["resized_from"], dtype=object)[fresh] != ""
            if resized_here.any():
                if progress.resized == 0:
                    example = paths[index[resized_here][0]]
                    logger.info("resizing images that are not 112x112 (first: %s)", example)
                progress.resized += int(resized_here.sum())
            progress.update(int(ok.sum()), int((~ok).sum()))
    except Exception as exc:
        emb_writer.flush()
        fail_writer.flush()
        raise EmbedError(
            f"the embedding pipeline failed ({type(exc).__name__}: {_first_line(exc)}); what was "
            f"finished is kept in {storage.redact(config.output)}: run again to resume"
        ) from exc
    progress.update(0, 0, force=True)
    if progress.resized:
        logger.info("%d images were resized to 112x112 (--resize)", progress.resized)
    missing = todo["index"].to_numpy()[~seen[todo["index"].to_numpy()]]
    if len(missing):
        raise EmbedError(
            f"internal error: {len(missing)} inputs never came back from the pipeline "
            f"(e.g. {paths[missing[0]]}); run again to resume"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""
