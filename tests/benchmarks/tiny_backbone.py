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

    class TinyBench(nn.Module):
        """conv1 (the key checkpoints of iResNets start with) -> mean -> fc."""

        def __init__(self, embedding_size: int) -> None:
            super().__init__()
            self.embedding_size = embedding_size
            self.input_size = 112
            self.conv1 = nn.Conv2d(3, 4, kernel_size=8, stride=8)
            self.fc = nn.Linear(4, embedding_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv1(x).mean(dim=(2, 3)))

    @register_backbone("tiny-bench")
    def tiny_bench(embedding_size: int = 16, **_: object) -> nn.Module:
        torch.manual_seed(0)
        return TinyBench(embedding_size)
