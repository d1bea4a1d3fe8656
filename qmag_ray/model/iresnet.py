"""iResNet ("improved ResNet" of ArcFace/InsightFace) exactly as MagFace uses it.

Module and parameter names follow MagFace's network one to one, so an official checkpoint's
keys map onto ``IResNet.state_dict()`` without renaming (spec: model.md). The
output is the unnormalised embedding whose norm MagFace trains to track face quality.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qmag_ray.model.registry import register_backbone

BN_EPS = 2e-5
# torch's momentum is the weight of the NEW batch: running = (1 - m) * running + m * batch.
# MagFace's trainer passes momentum=0.9 to torch (the running statistics are then ~90% the
# last batch); 0.1 (torch's default, MXNet's 0.9 convention) is the default here, which the
# bundled demo model was trained with. ``bn_momentum`` chooses (README "Training parity").
BN_MOMENTUM = 0.1
#: Dropout before the fully connected layer: ``element`` (nn.Dropout) or ``channel``
#: (nn.Dropout2d, whole channels, as MagFace's trainer). Neither has parameters, so the
#: checkpoint layout is the same; it matters for training and for SER-FIQ's passes.
DROPOUT_TYPES = ("element", "channel")
STAGE_WIDTHS = (64, 128, 256, 512)
INPUT_SIZE = 112


def _bn2d(channels: int, momentum: float = BN_MOMENTUM) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=momentum)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN, conv, BN, PReLU, strided conv, BN, plus shortcut."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, bn_momentum: float = BN_MOMENTUM
    ) -> None:
        super().__init__()
        self.bn1 = _bn2d(in_ch, bn_momentum)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = _bn2d(out_ch, bn_momentum)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = _bn2d(out_ch, bn_momentum)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                _bn2d(out_ch, bn_momentum),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """iResNet embedding network for aligned ``input_size`` x ``input_size`` BGR faces.

    Args:
        layers: blocks per stage (four stages, each starting with stride 2).
        widths: channels of the four stages; the stem has ``widths[0]`` channels.
        embedding_size: length of the output embedding.
        dropout: dropout rate before the fully connected layer (training only).
        input_size: side of the square input; must be divisible by 16.
        dropout_type: ``element`` or ``channel`` (see ``DROPOUT_TYPES``).
        bn_momentum: torch BatchNorm momentum (weight of the new batch; training only).
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = STAGE_WIDTHS,
        embedding_size: int = 512,
        dropout: float = 0.4,
        input_size: int = INPUT_SIZE,
        dropout_type: str = "element",
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        if dropout_type not in DROPOUT_TYPES:
            raise ValueError(f"dropout_type must be one of {DROPOUT_TYPES}, got {dropout_type!r}")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must lie in (0, 1], got {bn_momentum}")
        self.dropout_type = dropout_type
        self.bn_momentum = float(bn_momentum)
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1:
            raise ValueError(f"need four stages of >= 1 block, got layers={list(layers)}")
        if input_size % 16:
            raise ValueError(f"input_size must be divisible by 16, got {input_size}")
        self.layers = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        self.embedding_size = int(embedding_size)
        self.input_size = int(input_size)

        self.conv1 = _conv3x3(3, self.widths[0])
        self.bn1 = _bn2d(self.widths[0], bn_momentum)
        self.prelu = nn.PReLU(self.widths[0])
        in_ch = self.widths[0]
        stages = zip(self.layers, self.widths, strict=True)
        for index, (blocks, width) in enumerate(stages, start=1):
            stage = [IBasicBlock(in_ch, width, stride=2, bn_momentum=bn_momentum)]
            stage += [IBasicBlock(width, width, bn_momentum=bn_momentum) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            in_ch = width
        spatial = self.input_size // 16
        self.bn2 = _bn2d(in_ch, bn_momentum)
        self.dropout: nn.Module = (
            nn.Dropout2d(p=dropout) if dropout_type == "channel" else nn.Dropout(p=dropout)
        )
        self.fc = nn.Linear(in_ch * spatial * spatial, self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size, eps=BN_EPS, momentum=bn_momentum)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation for convolutions, unit scale and zero shift for BatchNorm."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(N, embedding_size)`` for faces ``(N, 3, input_size, input_size)``."""
        expected = (3, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input of shape (N, {expected}), got {tuple(x.shape)}")
        return self.head(self.trunk(x))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The network up to its last residual stage: ``(N, C, input_size/16, input_size/16)``."""
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def head(
        self, t: torch.Tensor, keep: torch.Tensor | None = None, dropout: float = 0.0
    ) -> torch.Tensor:
        """BatchNorm, dropout, linear, BatchNorm on a trunk output.

        With ``keep`` (a bool mask broadcastable to ``bn2(t)``, e.g. ``(passes, C, H, W)``
        for one image) the dropout is that fixed mask, kept units scaled by
        ``1 / (1 - dropout)``: one row per pass (SER-FIQ). Without it, the module's dropout.
        """
        x = self.bn2(t)
        x = self.dropout(x) if keep is None else x * keep.to(x.dtype) * (1.0 / (1.0 - dropout))
        return self.features(self.fc(torch.flatten(x, 1)))


@register_backbone("iresnet18")
def iresnet18(**kwargs: object) -> IResNet:
    """iResNet-18 (MagFace's CASIA-WebFace model), 512-d embedding."""
    return IResNet(layers=(2, 2, 2, 2), **kwargs)  # type: ignore[arg-type]


@register_backbone("iresnet34")
def iresnet34(**kwargs: object) -> IResNet:
    """iResNet-34, 512-d embedding."""
    return IResNet(layers=(3, 4, 6, 3), **kwargs)  # type: ignore[arg-type]


@register_backbone("iresnet50")
def iresnet50(**kwargs: object) -> IResNet:
    """iResNet-50 (MagFace's MS1MV2 model), 512-d embedding."""
    return IResNet(layers=(3, 4, 14, 3), **kwargs)  # type: ignore[arg-type]


@register_backbone("iresnet100")
def iresnet100(**kwargs: object) -> IResNet:
    """iResNet-100 (MagFace's flagship MS1MV2 model), 512-d embedding."""
    return IResNet(layers=(3, 13, 30, 3), **kwargs)  # type: ignore[arg-type]


@register_backbone("iresnet-demo")
def iresnet_demo(**kwargs: object) -> IResNet:
    """A tiny iResNet (~0.5 M parameters, 128-d) with the same key layout, for tests and demos.

    It is not trained on faces: use it to exercise the pipeline, never to judge accuracy.
    """
    options: dict[str, object] = {"widths": (8, 16, 32, 64), "embedding_size": 128}
    options.update(kwargs)
    return IResNet(layers=(1, 1, 1, 1), **options)  # type: ignore[arg-type]
