"""What an embedding run needs: inputs, checkpoint, output and how to spread the work."""

from __future__ import annotations

from dataclasses import dataclass


class EmbedError(RuntimeError):
    """An embedding run that cannot start or did not succeed; the message says why."""


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of one embedding run (``qmag-ray embed``).

    Attributes:
        images: URI of a tree ``<identity>/<image file>``; the identity is the first folder
            under it (files directly under it have no identity). Exclusive with ``manifest``.
        manifest: URI of a CSV or Parquet table with a ``path`` column (relative to
            ``images_root``) and an optional ``identity`` column.
        images_root: root the manifest's paths are relative to (default: the manifest's folder).
        model: URI of a MagFace checkpoint (local path, ``s3://``, ``gs://``...).
        arch: backbone name of the checkpoint, e.g. ``iresnet100``.
        output: URI of the output folder (``embeddings/``, ``failures/``, ``summary.json``).
        actors: number of model actors (each holds one copy of the network).
        gpus_per_actor: GPUs each actor takes (0 runs on CPU; fractions share a GPU).
        cpus_per_actor: CPUs reserved for each actor in Ray's scheduler.
        threads_per_actor: torch CPU threads in each actor (default: ``cpus_per_actor``
            rounded up); only matters without a GPU.
        batch_size: images per forward pass.
        read_cpus: CPUs reserved by each read-and-decode task. The pool is refused unless
            ``actors * cpus_per_actor + read_cpus`` fits the cluster, so decoding can always
            run next to the actors. One CPU per task (decoding is CPU-bound) also keeps the
            number of worker processes, and their start-up cost, low on small machines.
        read_block_rows: inputs per read task, which is also the granularity at which results
            come back (default: ``batch_size``).
        mixed_precision: autocast the forward pass on GPU (ignored on CPU).
        amp_dtype: ``float16`` or ``bfloat16`` for mixed precision.
        channels_last: channels-last memory format for the network and its input.
        resize: resize images that are not 112x112 (bilinear) instead of failing them.
        max_failure_fraction: the run fails when more than this fraction of inputs fail.
        overwrite: replace a finished output instead of refusing to touch it.
        wait_for_resources: start even when the Ray cluster does not yet have the CPUs and
            GPUs the actor pool needs (an autoscaling cluster adds nodes); without it such a
            run is refused at once instead of waiting for resources that may never come.
        rows_per_part: unused since the actors write one part per batch (kept so that older
            config files still load).
        progress_seconds: interval between progress log lines.
        read_attempts: attempts per file read before it is recorded as a transient failure
            (each attempt includes the storage client's own retries; waits double from 1 s).
        resources: custom Ray resources every task and actor of the run requires (e.g.
            ``{"embed_node": 0.01}`` keeps the work on the nodes that declare it); config file
            only.
    """

    images: str | None = None
    manifest: str | None = None
    images_root: str | None = None
    model: str = ""
    arch: str = ""
    output: str = ""
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    threads_per_actor: int | None = None
    batch_size: int = 64
    read_cpus: float = 1.0
    read_block_rows: int | None = None
    mixed_precision: bool = False
    amp_dtype: str = "float16"
    channels_last: bool = False
    resize: bool = False
    max_failure_fraction: float = 0.01
    overwrite: bool = False
    wait_for_resources: bool = False
    rows_per_part: int = 10_000
    progress_seconds: float = 10.0
    read_attempts: int = 5
    resources: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if bool(self.images) == bool(self.manifest):
            raise ValueError("give exactly one of images (a folder tree) or manifest (a table)")
        if self.images_root and not self.manifest:
            raise ValueError("images_root only applies with a manifest")
        for name in ("model", "arch", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        positive = ("actors", "batch_size", "read_block_rows", "rows_per_part", "read_attempts")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ValueError(f"threads_per_actor must be at least 1, got {self.threads_per_actor}")
        for name in ("gpus_per_actor", "cpus_per_actor", "read_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.cpus_per_actor == 0 and self.gpus_per_actor == 0:
            raise ValueError("an actor needs cpus_per_actor > 0 when it has no GPU")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(
                f"max_failure_fraction must be in [0, 1], got {self.max_failure_fraction}"
            )
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"amp_dtype must be float16 or bfloat16, got {self.amp_dtype!r}")
        for name, amount in (self.resources or {}).items():
            if not isinstance(amount, (int, float)) or amount <= 0:
                raise ValueError(f"resources.{name} must be a positive number, got {amount!r}")
        if self.progress_seconds <= 0:
            raise ValueError(f"progress_seconds must be positive, got {self.progress_seconds}")

    @property
    def block_rows(self) -> int:
        """Inputs per read task."""
        return self.read_block_rows or self.batch_size

    @property
    def torch_threads(self) -> int:
        """Torch CPU threads per actor."""
        if self.threads_per_actor is not None:
            return self.threads_per_actor
        return max(1, int(-(-self.cpus_per_actor // 1)))
