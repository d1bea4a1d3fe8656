"""Configuration of a MagFace training run (a frozen dataclass, loadable from YAML)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qmag_ray.training.magface import MagFaceParams

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """A MagFace training run on Ray Train.

    Attributes:
        data: a manifest (CSV/Parquet with ``path``, ``identity``), a folder holding
            ``manifest.parquet``, or an ``<identity>/<image>`` tree.
        output: folder or URI for checkpoints (``magface_epoch_XXXXX.pth``, MagFace layout)
            and ``history.json``.
        arch: registered backbone name.
        epochs: passes over the data; ``max_steps`` (if set) stops earlier.
        batch_size: images per worker and step.
        lr, momentum, weight_decay, optimizer: SGD (MagFace's choice) or AdamW.
        warmup_steps: linear learning-rate warm-up, followed by cosine decay to zero.
        num_workers, use_gpu, cpus_per_worker: Ray Train scaling.
        max_failures: worker-group restarts Ray Train may make after a lost worker; each
            resumes from the latest saved epoch.
        init_checkpoint: fine-tune from this checkpoint (any MagFace layout).
        dropout: override of the backbone's dropout rate (shapes are unaffected).
        flip: random horizontal flips.
        log_every: steps between reported metrics.
        checkpoint_every: epochs between checkpoints (the last epoch is always saved).
        loader_workers: DataLoader processes per Ray worker (0: decode in the training loop).
        magface: the loss's hyper-parameters.
    """

    data: str
    output: str
    arch: str = "iresnet-demo"
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    init_checkpoint: str | None = None
    dropout: float | None = None
    flip: bool = False
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 1
    loader_workers: int = 0
    magface: MagFaceParams = field(default_factory=MagFaceParams)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "num_workers", "cpus_per_worker", "log_every")
        for name in (*positive, "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}"
                )
        if self.max_failures < 0:
            raise ValueError(f"TrainConfig.max_failures must be >= 0, got {self.max_failures}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"TrainConfig.max_steps must be at least 1, got {self.max_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.loader_workers < 0:
            raise ValueError("TrainConfig: lr must be > 0, warmup_steps and loader_workers >= 0")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (the Ray Train loop config and the MLflow params)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        magface = values.pop("magface", None) or {}
        return cls(**values, magface=MagFaceParams(**magface))
