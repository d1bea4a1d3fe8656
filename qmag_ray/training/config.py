"""Settings of a MagFace training run (``qmag-ray train``): a ``qmag_ray.config`` model."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Any, Literal

from pydantic import TypeAdapter

from qmag_ray.config import Settings, option, section, settings
from qmag_ray.tracking.settings import TrackingConfig


class Optimizer(str, Enum):
    """The optimiser of the training loop."""

    SGD = "sgd"
    ADAMW = "adamw"


OPTIMIZERS = tuple(o.value for o in Optimizer)


@settings
class MagFaceParams(Settings):
    """Hyper-parameters of the MagFace loss (defaults: the paper's)."""

    l_a: float = option(10.0, "MagFace: lower magnitude bound l_a.")
    u_a: float = option(110.0, "MagFace: upper magnitude bound u_a.")
    l_m: float = option(0.45, "MagFace: margin at l_a.")
    u_m: float = option(0.8, "MagFace: margin at u_a.")
    lambda_g: float = option(35.0, "MagFace: weight of the magnitude regulariser g.", ge=0)
    scale: float = option(64.0, "MagFace: logit scale s.", gt=0)

    def check(self) -> None:
        if not 0 < self.l_a < self.u_a:
            raise ValueError(f"need 0 < `l_a` < `u_a`, got l_a={self.l_a}, u_a={self.u_a}")
        if not 0 <= self.l_m <= self.u_m < math.pi / 2:
            raise ValueError(f"need 0 <= `l_m` <= `u_m` < pi/2, got l_m={self.l_m}, u_m={self.u_m}")


@settings
class TrainConfig(Settings):
    """A MagFace training run on Ray Train.

    ``data`` is a manifest (CSV/Parquet with ``path``, ``identity``), a folder holding
    ``manifest.parquet``, or an ``<identity>/<image>`` tree; ``output`` receives checkpoints
    (``magface_epoch_XXXXX.pth``, MagFace layout) and ``history.json``. The learning rate
    warms up linearly for ``warmup_steps``, then decays to zero on a cosine.
    """

    data: str = option(
        help="Manifest (CSV/Parquet with path, identity), a folder with manifest.parquet, or "
        "an <identity>/<image> tree; local or URI.",
        min_length=1,
    )
    output: str = option(help="Folder or URI for checkpoints and history.json.", min_length=1)
    arch: str = option("iresnet-demo", "Registered backbone to train (see qmag-ray embed --arch).")
    epochs: int = option(10, "Passes over the data (--max-steps may stop earlier).", ge=1)
    max_steps: int | None = option(None, "Stop after this many steps.", ge=1)
    batch_size: int = option(64, "Images per worker and step.", ge=1)
    optimizer: Optimizer = option(Optimizer.SGD, "Optimiser: sgd (MagFace's choice) or adamw.")
    lr: float = option(0.1, "Peak learning rate.", gt=0)
    momentum: float = option(0.9, "SGD momentum.", ge=0)
    weight_decay: float = option(5e-4, "Weight decay.", ge=0)
    warmup_steps: int = option(100, "Steps of linear learning-rate warm-up.", ge=0)
    num_workers: int = option(1, "Ray Train workers.", ge=1)
    use_gpu: bool = option(False, "One GPU per worker.", flag="gpu")
    cpus_per_worker: int = option(1, "CPUs (torch threads) per worker.", ge=1)
    max_failures: int = option(
        2, "Restarts after a lost worker, each resuming from the last saved epoch.", ge=0
    )
    init_checkpoint: str | None = option(
        None, "Fine-tune from this checkpoint (any MagFace layout)."
    )
    dropout: float | None = option(
        None, "Override of the backbone's dropout rate (shapes are unaffected).", ge=0, lt=1
    )
    dropout_type: Literal["element", "channel"] = option(
        "element",
        "Head dropout: element (nn.Dropout, the demo model's) or channel (Dropout2d, MagFace's).",
    )
    bn_momentum: float = option(
        0.1,
        "torch BatchNorm momentum, the new batch's weight (0.1 the demo model's; MagFace passes "
        "0.9).",
        gt=0,
        le=1,
    )
    flip: bool = option(False, "Random horizontal flips.")
    seed: int = option(0, "Seed of initialisation, shuffling and augmentation.")
    log_every: int = option(20, "Steps between reported metrics.", ge=1)
    checkpoint_every: int = option(
        1, "Epochs between checkpoints (the last epoch is always saved).", ge=1
    )
    loader_workers: int = option(
        0, "DataLoader processes per Ray worker (0: decode in the training loop).", ge=0
    )
    magface: MagFaceParams = section(MagFaceParams, "The loss's hyper-parameters.")
    tracking: TrackingConfig = section(
        TrackingConfig,
        "MLflow: the run is logged when a tracking URI is given or MLFLOW_TRACKING_URI is set.",
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (the Ray Train loop config and the MLflow params)."""
        data = dataclasses.asdict(self)
        data["optimizer"] = self.optimizer.value
        return data

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return TypeAdapter(cls).validate_python(dict(values))


def backbone_kwargs(cfg: TrainConfig) -> dict[str, object]:
    """Keyword arguments of the backbone factory that training settings choose."""
    kwargs: dict[str, object] = {"dropout_type": cfg.dropout_type, "bn_momentum": cfg.bn_momentum}
    if cfg.dropout is not None:
        kwargs["dropout"] = cfg.dropout
    return kwargs
