"""The Ray side of an embedding run: listing and accounting tasks, and the Ray Data pipeline.

Listing tasks (one per shard) produce each shard's inputs in the object store; planning tasks
subtract what the output already holds; read-and-decode tasks (one CPU each by default) feed a
pool of :class:`~qmag_ray.embedding.writer.PartWritingActor`, which embed and write Parquet
parts on the worker nodes; checking tasks then verify every shard. The driver only holds
object references, per-shard counts and the per-batch counts it logs as progress.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from qmag_ray import storage
from qmag_ray.embedding.config import EmbedConfig, EmbedError, EmbedInputError
from qmag_ray.embedding.inputs import LandmarkTable, read_and_decode
from qmag_ray.embedding.writer import PartSpec, PartWritingActor

logger = logging.getLogger(__name__)

STALL_SECONDS = 30.0
"""A store retry this recent shows in the progress line."""


class Progress:
    """Counts results, logs a progress line every ``interval`` seconds, times the pipeline.

    While the pipeline runs a daemon thread also logs the line when no result arrived for an
    interval, so that a stalled store (``store: retrying ...``) shows while the tasks wait.
    """

    def __init__(self, total: int, interval: float, monitor: Any = None) -> None:
        self.total, self.interval = total, interval
        self.monitor = monitor
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.begin()
        self.first: float | None = None
        self.first_images = 0
        self.connect_seconds = 0.0
        self.embedded = self.failed = self.logged = 0
        self.resized = 0

    def begin(self) -> None:
        """Start the clock (when the pipeline starts)."""
        self.start = self.last = time.perf_counter()

    def __enter__(self) -> Progress:
        threading.Thread(target=self._beat, name="qmag-progress", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.update(0, 0)

    def update(self, embedded: int, failed: int, *, force: bool = False) -> None:
        with self._lock:
            self._update(embedded, failed, force)

    def _update(self, embedded: int, failed: int, force: bool) -> None:
        now = time.perf_counter()
        if self.first is None and embedded + failed:
            self.first, self.first_images = now, embedded + failed
        self.embedded += embedded
        self.failed += failed
        done = self.embedded + self.failed
        if (force and done != self.logged) or now - self.last >= self.interval:
            self.last, self.logged = now, done
            logger.info(
                "embedded %d, failed %d, %d/%d done (%.1f%%), %.1f images/s%s",
                self.embedded,
                self.failed,
                done,
                self.total,
                100.0 * done / max(self.total, 1),
                done / max(now - self.start, 1e-9),
                self.store_note(),
            )

    def store_note(self) -> str:
        """``, store: retrying ...`` while the object store is failing, else empty."""
        if self.monitor is None:
            return ""
        import ray

        try:
            snap = ray.get(self.monitor.snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - the note is informative only
            return ""
        if not snap["retries"] or time.time() - snap["when"] > STALL_SECONDS:
            return ""
        return f", store: retrying ({snap['retries']} retries so far; last: {snap['last']})"

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
    for name, amount in (config.resources or {}).items():
        need = amount * (config.actors + 1)
        have = float(res.get(name, 0))
        if need > have:
            problems.append(
                f"the actors and a read task need {need:g} of the custom resource {name!r} "
                f"but the Ray cluster has {have:g} (resources)"
            )
    if not problems:
        return
    if config.wait_for_resources:
        for problem in problems:
            logger.warning("%s; waiting for the autoscaler (--wait-for-resources)", problem)
        return
    raise EmbedInputError(
        "; ".join(problems)
        + " (on an autoscaling cluster pass --wait-for-resources to wait for new nodes)"
    )


def remote_options(config: EmbedConfig, cpus: float) -> dict[str, Any]:
    """Ray options of the job's tasks: ``cpus`` and the configured custom resources."""
    options: dict[str, Any] = {"num_cpus": cpus}
    if config.resources:
        options["resources"] = dict(config.resources)
    return options


def build_dataset(  # noqa: ANN201 - a ray Dataset
    config: EmbedConfig,
    todo_refs: list,
    root: str,
    spec: PartSpec,
    monitor: Any,
    landmarks: LandmarkTable | None = None,
):
    """Ray Data over the shards' todo tables: read+decode tasks, then the part-writing actors."""
    import ray
    import ray.data

    from qmag_ray.cli.console import quiet_ray_data

    quiet_ray_data()  # Ray Data's progress bars and INFO lines only with --verbose
    ds = ray.data.from_arrow_refs(todo_refs)
    extra = {"resources": dict(config.resources)} if config.resources else {}
    ds = ds.map_batches(
        read_and_decode,
        # Ray Data fuses a task map into the actor map after it when their remote arguments
        # match (``--read-cpus`` equal to ``--cpus-per-actor``, no GPU: the CPU default), and
        # decoding then runs inside the model actors, one batch after the other, leaving the
        # CPUs reserved for reading idle. ``max_calls`` is an argument only tasks have: given
        # explicitly (0, Ray's default: a worker runs any number of tasks) it keeps the two
        # operators apart, so decoding runs in tasks next to the actors.
        max_calls=0,
        fn_kwargs={
            "root": root,
            "resize": config.resize,
            "monitor": monitor,
            "landmarks": landmarks,
            "attempts": config.read_attempts,
        },
        batch_size=config.block_rows,
        batch_format="numpy",
        num_cpus=config.read_cpus,
        **extra,
    )
    return ds.map_batches(
        PartWritingActor,
        fn_constructor_args=(config.model, config.arch),
        fn_constructor_kwargs={
            "spec": spec,
            "monitor": monitor,
            "use_gpu": config.gpus_per_actor > 0,
            "threads": config.torch_threads,
            "mixed_precision": config.mixed_precision,
            "amp_dtype": config.amp_dtype,
            "channels_last": config.channels_last,
            "flip": config.flip,
            "serfiq": None if config.serfiq_settings is None else config.serfiq_settings.to_dict(),
            "input_convention": config.input_convention,
        },
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
        batch_size=config.batch_size,
        batch_format="numpy",
        **extra,
    )


class BatchCounts:
    """What the driver keeps of the pipeline's results: counts and a few failure examples."""

    def __init__(self) -> None:
        self.embedded = self.failed = self.transient = self.resized = self.parts = 0
        self.examples: list[dict[str, str]] = []
        self._seen: set[tuple[int, int, int]] = set()

    def add(self, batch: dict) -> tuple[int, int]:
        """Count one result batch (one row per part); a range delivered twice counts once."""
        embedded = failed = 0
        for i in range(len(batch["shard"])):
            key = (int(batch["shard"][i]), int(batch["start"][i]), int(batch["end"][i]))
            if key in self._seen:
                logger.warning("the pipeline delivered part %s twice; counted once", key)
                continue
            self._seen.add(key)
            self.parts += 1
            embedded += int(batch["embedded"][i])
            failed += int(batch["failed"][i])
            self.transient += int(batch["transient"][i])
            self.resized += int(batch["resized"][i])
            for example in json.loads(str(batch["examples"][i])):
                if len(self.examples) < 20:
                    self.examples.append(example)
        self.embedded += embedded
        self.failed += failed
        return embedded, failed


def run_pipeline(
    config: EmbedConfig,
    todo_refs: list,
    root: str,
    spec: PartSpec,
    progress: Progress,
    monitor: Any,
    landmarks: LandmarkTable | None = None,
) -> BatchCounts:
    """Run the Ray Data pipeline over the todo tables; the actors write the parts."""
    counts = BatchCounts()
    progress.begin()
    ds = build_dataset(config, todo_refs, root, spec, monitor, landmarks)
    try:
        with progress:
            batches = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
            for batch in batches:
                embedded, failed = counts.add(batch)
                if counts.resized and progress.resized == 0:
                    logger.info("resizing images that are not 112x112 (--resize)")
                progress.resized = counts.resized
                progress.update(embedded, failed)
    except Exception as exc:
        raise EmbedError(
            f"the embedding pipeline failed ({type(exc).__name__}: {_first_line(exc)}); what was "
            f"finished is kept in {storage.redact(config.output)}: run again to resume"
        ) from exc
    progress.update(0, 0, force=True)
    if progress.resized:
        logger.info("%d images were resized to 112x112 (--resize)", progress.resized)
    return counts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""
