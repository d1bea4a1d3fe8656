"""Embedding backbones (iResNet) and MagFace checkpoint loading.

Importing this package imports torch and registers the built-in backbones: ``iresnet18``,
``iresnet34``, ``iresnet50``, ``iresnet100`` and the tiny ``iresnet-demo`` for tests.
"""

from __future__ import annotations

from qmag_ray.model import iresnet as iresnet  # registers the backbones
from qmag_ray.model.checkpoint import (
    LAYOUTS,
    CheckpointError,
    backbone_state_dict,
    describe_checkpoint,
    load_backbone,
    read_checkpoint,
    save_checkpoint,
    select_device,
)
from qmag_ray.model.iresnet import IBasicBlock, IResNet
from qmag_ray.model.registry import (
    backbone_names,
    canonical_name,
    create_backbone,
    register_backbone,
)

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "IBasicBlock",
    "IResNet",
    "backbone_names",
    "backbone_state_dict",
    "canonical_name",
    "create_backbone",
    "describe_checkpoint",
    "load_backbone",
    "read_checkpoint",
    "register_backbone",
    "save_checkpoint",
    "select_device",
]
