"""MagFace training on Ray Train: the loss, the data, the worker loop and the driver."""

from qmag_ray.training.config import TrainConfig
from qmag_ray.training.magface import (
    MagFaceHead,
    MagFaceParams,
    magface_logits,
    magface_loss,
    magnitude,
    margin,
    regulariser,
)

__all__ = [
    "MagFaceHead",
    "MagFaceParams",
    "TrainConfig",
    "magface_logits",
    "magface_loss",
    "magnitude",
    "margin",
    "regulariser",
]
