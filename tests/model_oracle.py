"""The MagFace network and its input written plainly from ``../shared/spec/model.md``.

An oracle for the model tests: it imports nothing from ``qmag_ray`` (``test_oracles.py``
checks that). The forward pass is a sequence of ``torch.nn.functional`` calls on a state dict,
in the order the spec states; the weights are deterministic functions of the parameter NAME,
so the same name gets the same tensor in any process and whichever model loads it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BN_EPS = 2e-5  # spec: every BatchNorm uses eps = 2e-5
LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
WIDTHS = (64, 128, 256, 512)


# --------------------------------------------------------------------------- input (spec: Input)
def magface_input(jpeg_or_png: bytes) -> np.ndarray:
    """One aligned 112x112 face file -> float32 (3, 112, 112): BGR, values / 255, CHW."""
    with Image.open(io.BytesIO(jpeg_or_png)) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if rgb.shape != (112, 112, 3):
        raise ValueError(f"oracle: expected an aligned 112x112 face, got {rgb.shape}")
    bgr = rgb[:, :, ::-1]
    return (bgr.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)).copy()


# --------------------------------------------------------------------------- parameters
def bn_names(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{p}": (channels,) for p in ("weight", "bias", "running_mean", "running_var")}


def iresnet_shapes(
    layers: tuple[int, int, int, int],
    widths: tuple[int, int, int, int] = WIDTHS,
    embedding_size: int = 512,
    input_size: int = 112,
) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer of the backbone (names and shapes from the spec)."""
    w0 = widths[0]
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (w0, 3, 3, 3)}
    shapes |= bn_names("bn1", w0)
    shapes["prelu.weight"] = (w0,)
    in_ch = w0
    for stage, (blocks, width) in enumerate(zip(layers, widths, strict=True), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            shapes |= bn_names(f"{p}.bn1", in_ch)
            shapes[f"{p}.conv1.weight"] = (width, in_ch, 3, 3)
            shapes |= bn_names(f"{p}.bn2", width)
            shapes[f"{p}.prelu.weight"] = (width,)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            shapes |= bn_names(f"{p}.bn3", width)
            if b == 0:  # every stage starts with stride 2: the shape changes
                shapes[f"{p}.downsample.0.weight"] = (width, in_ch, 1, 1)
                shapes |= bn_names(f"{p}.downsample.1", width)
            in_ch = width
    side = input_size // 16
    shapes |= bn_names("bn2", in_ch)
    shapes["fc.weight"] = (embedding_size, in_ch * side * side)
    shapes["fc.bias"] = (embedding_size,)
    shapes |= bn_names("features", embedding_size)
    return shapes


def keyed_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor that depends only on ``name`` (sha256 of it seeds the generator).

    Scales keep activations of the 100-layer network finite: convolutions and the linear
    layer ~ N(0, 1/fan_in), BatchNorm scales in [0.5, 1.5], shifts and means ~ N(0, 0.1),
    variances in [0.5, 1.5], PReLU slopes in [0.05, 0.45] (so no slope is 0.25, its default).
    """
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) > 1:  # conv or linear weight
        fan_in = int(np.prod(shape[1:]))
        return torch.randn(shape, generator=gen, dtype=torch.float64).float() / fan_in**0.5
    u = torch.rand(shape, generator=gen, dtype=torch.float64).float()
    if ".prelu." in f".{name}" or name == "prelu.weight":
        return 0.05 + 0.4 * u
    if leaf in ("weight", "running_var"):
        return 0.5 + u
    return 0.2 * (u - 0.5)  # bias, running_mean


def keyed_state(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: keyed_tensor(name, shape) for name, shape in shapes.items()}


# --------------------------------------------------------------------------- forward
def _bn(x: torch.Tensor, p: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        p[f"{name}.running_mean"],
        p[f"{name}.running_var"],
        p[f"{name}.weight"],
        p[f"{name}.bias"],
        training=False,
        eps=BN_EPS,
    )


def iresnet_forward(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Inference of an iResNet state dict on NCHW input, exactly in the spec's order.

    The number of stages' blocks is read from the keys (``layer{s}.{b}.conv1.weight``).
    """
    x = _bn(F.conv2d(x, p["conv1.weight"], stride=1, padding=1), p, "bn1")
    x = F.prelu(x, p["prelu.weight"])
    for stage in range(1, 5):
        b = 0
        while f"layer{stage}.{b}.conv1.weight" in p:
            q = f"layer{stage}.{b}"
            stride = 2 if b == 0 else 1
            out = _bn(x, p, f"{q}.bn1")
            out = F.conv2d(out, p[f"{q}.conv1.weight"], stride=1, padding=1)
            out = _bn(out, p, f"{q}.bn2")
            out = F.prelu(out, p[f"{q}.prelu.weight"])
            out = F.conv2d(out, p[f"{q}.conv2.weight"], stride=stride, padding=1)
            out = _bn(out, p, f"{q}.bn3")
            if f"{q}.downsample.0.weight" in p:
                short = F.conv2d(x, p[f"{q}.downsample.0.weight"], stride=stride)
                short = _bn(short, p, f"{q}.downsample.1")
            else:
                short = x
            x = out + short  # no activation after the add
            b += 1
    x = _bn(x, p, "bn2")  # dropout: identity at inference
    x = F.linear(torch.flatten(x, 1), p["fc.weight"], p["fc.bias"])
    return _bn(x, p, "features")


def backbone_from_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of a MagFace training checkpoint (tensors only)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    for prefix in ("features.module.", "module.features.", "features."):
        found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    return dict(state)
