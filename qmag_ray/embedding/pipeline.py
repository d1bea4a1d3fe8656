"""The Ray side of an embedding run: the Ray Data pipeline and streaming its results to Parquet.

Read-and-decode tasks (one CPU each by default) feed a pool of :class:`EmbedActor`; the driver
consumes the results block by block with ``iter_batches`` and hands them to the part writers,
so memory stays bounded whatever the number of images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from qmag_ray import storage
from qmag_ray.embedding.actor import EmbedActor
from qmag_ray.embedding.config import EmbedConfig, EmbedError
from qmag_ray.embedding.inputs import Inputs, read_and_decode
from qmag_ray.embedding.output import PartWriter, embedding_batch, failure_batch

logger = logging.getLogger(__name__)


class Progress:
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


def check_resources(config: EmbedConfig) -> None:
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


def build_dataset(config: EmbedConfig, todo: pd.DataFrame, root: str):  # noqa: ANN202 - ray Dataset
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
            "serfiq": None if config.serfiq_settings is None else config.serfiq_settings.to_dict(),
            "input_convention": config.input_convention,
        },
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
        batch_size=config.batch_size,
        batch_format="numpy",
    )


def run_pipeline(
    config: EmbedConfig,
    todo: pd.DataFrame,
    inputs: Inputs,
    emb_writer: PartWriter,
    fail_writer: PartWriter,
    failure_examples: list[dict[str, str]],
    progress: Progress,
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
    check_resources(config)
    paths = inputs.table["path"].to_numpy(dtype=object)
    identities = inputs.table["identity"].to_numpy(dtype=object)
    seen = np.zeros(len(paths), dtype=bool)
    progress.begin()
    ds = build_dataset(config, todo, inputs.root)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            index = np.asarray(batch["index"], dtype=np.int64)
            errors = np.asarray(batch["error"], dtype=object)
            emb = np.asarray(batch["embedding"], dtype=np.float32)
            serfiq = np.asarray(batch["serfiq"], np.float32) if "serfiq" in batch else None
            fresh = ~seen[index]
            if not fresh.all():
                logger.warning("dropping %d rows the pipeline delivered twice", (~fresh).sum())
                index, errors, emb = index[fresh], errors[fresh], emb[fresh]
                serfiq = None if serfiq is None else serfiq[fresh]
            seen[index] = True
            ok = errors == ""
            finite = np.isfinite(emb).all(axis=1)
            if (ok & ~finite).any():
                errors = errors.copy()
                errors[ok & ~finite] = "embedding is not finite (NaN or inf): check the checkpoint"
                ok &= finite
            extra = None if serfiq is None else {"serfiq": serfiq[ok]}
            emb_writer.add(embedding_batch(paths[index[ok]], identities[index[ok]], emb[ok], extra))
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
