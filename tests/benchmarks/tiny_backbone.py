"""A tiny backbone registered for the driver-memory benchmark (``tiny-bench``, 16-d).

It makes the forward pass negligible so that the benchmark measures what the driver holds,
not inference. Ray workers register it through ``worker_process_setup_hook``
(``tiny_backbone.register``), the benchmark's driver by calling :func:`register`.
"""

from __future__ import annotations


def register() -> None:
    import torch
    from torch import nn

    from qmag_ray.model.registry import backbone_names, register_backbone

    if "tiny-bench" in backbone_names():
        return

    @register_backbone("tiny-bench")
    def tiny_bench(embedding_size: int = 16, **_: object) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, kernel_size=8, stride=8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, embedding_size),
        )
