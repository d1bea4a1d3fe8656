"""MagFace training on Ray Train: the loss, the data, the worker loop and the driver.

Public names resolve on first use: importing this package (for ``TrainConfig``, say, from the
command line) does not import torch.
"""

from __future__ import annotations

from qmag_ray._lazy import lazy_exports

_LAZY = {
    "TrainConfig": "qmag_ray.training.config",
    "MagFaceHead": "qmag_ray.training.magface",
    "MagFaceParams": "qmag_ray.training.magface",
    "magface_logits": "qmag_ray.training.magface",
    "magface_loss": "qmag_ray.training.magface",
    "magnitude": "qmag_ray.training.magface",
    "margin": "qmag_ray.training.magface",
    "regulariser": "qmag_ray.training.magface",
}

__all__ = list(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
