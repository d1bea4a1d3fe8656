"""``run_embed``: the embedding job from images in storage to Parquet, on Ray.

Stages: the driver checks the checkpoint and looks at the inputs' first level (before any Ray
work), takes the output's lease, then Ray tasks list the inputs shard by shard and subtract
what the output already holds; Ray Data reads and decodes files in CPU tasks and a pool of
:class:`~qmag_ray.embedding.writer.PartWritingActor` embeds them and writes the Parquet parts
where they are produced; checking tasks verify that every input is exactly once in
``embeddings/`` or ``failures/``. The driver holds object references and counts only, so its
memory does not grow with the number of images.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from qmag_ray import lease, storage
from qmag_ray._text import counted
from qmag_ray.alignment import ALIGNMENT
from qmag_ray.embedding import tasks
from qmag_ray.embedding.config import EmbedConfig, EmbedError
from qmag_ray.embedding.inputs import load_landmarks
from qmag_ray.embedding.output import (
    EmbedSummary,
    OutputLayout,
    inspect,
    start,
    write_summary,
)
from qmag_ray.embedding.pipeline import Progress, check_resources, run_pipeline
from qmag_ray.embedding.retry import StoreMonitor
from qmag_ray.embedding.writer import PartSpec
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
        connect: called once checkpoint, inputs and output have been checked, just before the
            first Ray work (entry points pass ``lambda: runtime.connect_ray(address)``). Without
            it Ray must already be connected.

    Raises:
        EmbedError: bad inputs or output, a pipeline failure, or more failed images than
            ``max_failure_fraction`` allows (everything is still written, with a summary whose
            status is ``failed``).
        CheckpointError: the checkpoint does not fit the architecture or is unsafe.
        lease.LeaseHeldError: another run is writing the output (the message names it).
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
    config = _absolute(config)
    source = tasks.describe_source(config)
    layout = OutputLayout(config.output)
    landmarks = load_landmarks(config)  # read (and checked) before any Ray work
    fingerprint = {
        "model_sha256": model_sha,
        "arch": arch,
        "preprocessing": PREPROCESSING,
        "resize": config.resize,
        "images_root": storage.redact(source.root),
    }
    if landmarks is not None or config.flip:  # only then: earlier outputs still resume
        fingerprint["alignment"] = ALIGNMENT if landmarks is not None else None
        fingerprint["flip"] = config.flip
    if config.serfiq_settings is not None:  # resuming must not mix parts with and without it
        fingerprint["serfiq"] = config.serfiq_settings.to_dict()
    if config.is_onnx:
        fingerprint["input_convention"] = config.input_convention
    held = _take_lease(config.output)
    try:
        state = inspect(layout, fingerprint, overwrite=config.overwrite)
        connect_seconds = _connect(connect)
        check_resources(config)
        import ray

        shards = state.shards or source.default_shards()
        listings, list_metas = tasks.list_shards(config, source, shards, layout)
        total = sum(m["rows"] for m in list_metas)
        start(layout, state, fingerprint, shards)
        todo_refs, plans = tasks.plan_shards(config, listings, layout.root)
        todo = sum(p["todo"] for p in plans)
        done_embedded = sum(p["done_embedded"] for p in plans)
        retried = sum(p["retried_transient"] for p in plans)
        logger.info(
            "embedding %s (%s in %s, %d already embedded, %s%s) from %s with %s (%d-d) on "
            "%d actor(s)",
            counted(todo, "image"),
            counted(total, "input"),
            counted(shards, "shard"),
            done_embedded,
            counted(sum(p["done_failed"] for p in plans), "kept failure"),
            f", {counted(retried, 'transient failure')} retried" if retried else "",
            storage.redact(source.root),
            config.arch,
            dim,
            config.actors,
        )
        extra_columns = ("serfiq",) if config.serfiq_settings is not None else ()
        fence = held.fence_token() if held is not None else None
        spec = PartSpec(layout.root, run_id, model_sha, arch, dim, extra_columns, fence)
        monitor = ray.remote(num_cpus=0)(StoreMonitor).remote()
        progress = Progress(todo, config.progress_seconds, monitor)
        progress.connect_seconds = connect_seconds
        counts = None
        try:
            if todo_refs:
                counts = run_pipeline(
                    config, todo_refs, source.root, spec, progress, monitor, landmarks=landmarks
                )
        finally:
            ray.kill(monitor)
        checks = tasks.check_shards(config, listings, layout.root, model_sha)
        summary = _summary(
            config,
            source,
            layout,
            run_id,
            started,
            progress,
            counts,
            checks,
            plans,
            shards,
            model_sha,
            arch,
            dim,
            sum(m["ignored"] for m in list_metas),
            aligned=landmarks is not None,
        )
        _verify(summary, checks)
        if held is not None:
            held.fence()  # re-read from the store: a stalled run taken over is refused here
        write_summary(layout, summary)
    finally:
        if held is not None:
            held.release()
    # the summary is what the caller prints (the CLI's one result line): logged again only
    # when the run failed (before the error) or with --verbose
    logger.log(logging.INFO if summary.status == "failed" else logging.DEBUG, "%s", summary.line())
    if summary.status == "failed":
        listed = "; ".join(f"{e['path']}: {e['error']}" for e in summary.failure_examples[:5])
        fraction = summary.failed / max(summary.inputs, 1)
        raise EmbedError(
            f"{summary.failed} of {summary.inputs} inputs failed ({100 * fraction:.2f}% > "
            f"--max-failure-fraction {100 * config.max_failure_fraction:.2f}%), e.g. {listed}; "
            f"all failures are in {storage.redact(layout.failures)}"
            + (
                f"; {summary.transient} of them could not be read from the store: run the same "
                "command again to retry them"
                if summary.transient
                else ""
            )
        )
    return summary


def _absolute(config: EmbedConfig) -> EmbedConfig:
    """Local paths made absolute: tasks and actors run in other working directories."""
    import dataclasses

    changes = {
        name: storage.absolute(getattr(config, name))
        for name in ("images", "manifest", "images_root", "model", "output")
        if getattr(config, name)
    }
    return dataclasses.replace(config, **changes)


def _take_lease(output: str) -> lease.Lease | None:
    if not lease.supported(output):
        logger.warning(
            "%s:// outputs cannot be leased: make sure no other run writes %s",
            storage.protocol(output),
            storage.redact(output),
        )
        return None
    return lease.acquire(output, purpose="embed")


def _connect(connect: Callable[[], Any] | None) -> float:
    import ray

    began = time.perf_counter()
    if connect is not None:
        connect()
    if not ray.is_initialized():
        raise EmbedError("Ray is not connected: call qmag_ray.runtime.connect_ray() first")
    return time.perf_counter() - began


def _summary(
    config: EmbedConfig,
    source: tasks.Source,
    layout: OutputLayout,
    run_id: str,
    started: float,
    progress: Progress,
    counts: Any,
    checks: list[dict[str, Any]],
    plans: list[dict[str, Any]],
    shards: int,
    model_sha: str,
    arch: str,
    dim: int,
    ignored: int,
    *,
    aligned: bool = False,
) -> EmbedSummary:
    wall = time.perf_counter() - started
    busy = wall - progress.connect_seconds  # starting a local Ray is not the job's throughput
    inputs = sum(c["inputs"] for c in checks)
    failed = sum(c["failed"] for c in checks)
    processed = (counts.embedded + counts.failed) if counts else 0
    fraction = failed / max(inputs, 1)
    examples = list(counts.examples) if counts else []
    return EmbedSummary(
        status="failed" if fraction > config.max_failure_fraction else "succeeded",
        output=storage.redact(config.output),
        run_id=run_id,
        inputs=inputs,
        embedded=sum(c["embedded"] for c in checks),
        failed=failed,
        transient=sum(c["transient"] for c in checks),
        skipped_existing=sum(p["done_embedded"] for p in plans),
        embedded_this_run=counts.embedded if counts else 0,
        resized=counts.resized if counts else 0,
        ignored_files=ignored,
        model_uri=storage.redact(config.model),
        model_sha256=model_sha,
        arch=arch,
        embedding_size=dim,
        preprocessing=PREPROCESSING,
        images_per_second=processed / busy if busy > 0 else 0.0,
        wall_seconds=wall,
        timings=progress.timings() if counts else {},
        settings={
            **_settings(config, source.root),
            "alignment": ALIGNMENT if aligned else None,
            "landmarks": storage.redact(config.landmarks) if config.landmarks else None,
            "flip": config.flip,
        },
        versions=package_versions(),
        failure_examples=examples,
        shards=shards,
        nodes=sorted({n for c in checks for n in c["nodes"]}),
    )


def _verify(summary: EmbedSummary, checks: list[dict[str, Any]]) -> None:
    """Refuse to finish an output whose parts do not hold every input exactly once."""
    where = summary.output
    problems = []
    for key, what in (
        ("missing", "inputs have no result"),
        ("repeated", "paths have more than one result"),
        ("stray", "results are for paths that are not inputs"),
    ):
        n = sum(c[key] for c in checks)
        if n:
            examples = [e for c in checks for e in c[f"{key}_examples"]][:3]
            problems.append(f"{n} {what} (e.g. {', '.join(examples)})")
    other = [e for c in checks for e in c["other_model_parts"]]
    if other:
        problems.append(f"parts written with another model: {', '.join(other[:3])}")
    if problems:
        raise EmbedError(
            f"{where} is not complete: {'; '.join(problems)}; it is left without summary.json: "
            "run again to resume (or --overwrite to start over)"
        )
    if summary.embedded + summary.failed != summary.inputs:
        raise EmbedError(
            f"internal error: {summary.embedded} embedded + {summary.failed} failed != "
            f"{summary.inputs} inputs; the output in {where} is left unfinished"
        )


def _settings(config: EmbedConfig, root: str) -> dict[str, Any]:
    return {
        "images": storage.redact(config.images) if config.images else None,
        "manifest": storage.redact(config.manifest) if config.manifest else None,
        "images_root": storage.redact(root),
        "actors": config.actors,
        "gpus_per_actor": config.gpus_per_actor,
        "cpus_per_actor": config.cpus_per_actor,
        "threads_per_actor": config.torch_threads,
        "batch_size": config.batch_size,
        "read_cpus": config.read_cpus,
        "read_block_rows": config.block_rows,
        "mixed_precision": config.mixed_precision,
        "amp_dtype": config.amp_dtype.value,
        "channels_last": config.channels_last,
        "resize": config.resize,
        "max_failure_fraction": config.max_failure_fraction,
        "wait_for_resources": config.wait_for_resources,
        "resources": dict(config.resources or {}),
        "read_attempts": config.read_attempts,
        "quality": config.quality,
        "input_convention": config.input_convention or "magface",
        # the registry's iResNets are MagFace-trained; an ONNX model's norm is not a quality
        "norm_is_quality": not config.is_onnx,
        "serfiq": None if config.serfiq_settings is None else config.serfiq_settings.to_dict(),
    }
