"""SER-FIQ: face image quality from the robustness of an embedding under dropout.

Terhörst et al. (CVPR 2020, "SER-FIQ: Unsupervised Estimation of Face Image Quality Based on
Stochastic Embedding Robustness") pass an image ``m`` times through a network with dropout
active and take the spread of the ``m`` stochastic embeddings ``x_1 ... x_m`` (each
normalised to unit length) as the quality:

    q = 2 * sigmoid( -(2 / m^2) * sum_{i<j} ||x_i - x_j||_2 )

in (0, 1], 1 when all passes agree. (The authors' reference code divides by the number of
pairs, m (m - 1) / 2, instead of m^2 / 2: the same ordering of images, a distance scale that
differs by (m - 1) / m.) Only the layers after the dropout are repeated: the trunk of an
iResNet (up to its last residual stage) runs once, its head (BatchNorm, dropout, linear,
BatchNorm) ``m`` times on the same trunk output, which the authors note makes it nearly as
cheap as one embedding.

Dropout masks are a pure function of ``(seed, image path)``: numpy's PCG64 generator seeded
with a hash of both draws them on the CPU, so an image gets the same masks whatever its batch,
actor, device (CPU or CUDA) or the order of the inputs. Kept units
are scaled by ``1 / (1 - p)`` as torch's dropout does. The dropout type follows the backbone:
element dropout (one draw per feature) or channel dropout (``Dropout2d``: one draw per
channel, shared over its spatial positions, as MagFace's trainer uses).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

MASK_VERSION = "pcg64-uint16/1"


@dataclass(frozen=True)
class SerfiqSettings:
    """SER-FIQ options of the embed job.

    Attributes:
        passes: stochastic passes per image (m; the paper uses 100).
        dropout: dropout rate of the passes (the paper's ArcFace head uses 0.5).
        seed: seed of the dropout masks (with each image's path).
        dropout_type: ``element`` (one draw per feature) or ``channel`` (one per channel,
            ``Dropout2d``, as MagFace's trainer); match the dropout the network was trained
            with.
    """

    passes: int = 100
    dropout: float = 0.5
    seed: int = 0
    dropout_type: str = "element"

    def __post_init__(self) -> None:
        if self.passes < 2:
            raise ValueError(f"serfiq passes must be >= 2, got {self.passes}")
        if not 0.0 < self.dropout < 1.0:
            raise ValueError(f"serfiq dropout must lie in (0, 1), got {self.dropout}")
        if self.dropout_type not in ("element", "channel"):
            raise ValueError(
                f"serfiq dropout type must be element or channel, got {self.dropout_type!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "dropout": self.dropout,
            "seed": self.seed,
            "dropout_type": self.dropout_type,
            "masks": MASK_VERSION,
        }


def image_key(seed: int, path: str) -> int:
    """The 63-bit mask key of one image: sha256 of the seed and its path."""
    digest = hashlib.sha256(f"serfiq\0{int(seed)}\0{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_masks(key: int, passes: int, units: int, dropout: float) -> np.ndarray:
    """(passes, units) bool array: True where a unit is kept in a pass.

    Draws ``passes * units`` 16-bit integers from numpy's PCG64 seeded with ``key``; a unit is
    dropped when its draw is below ``round(dropout * 65536)``. Drawn on the CPU whatever the
    device, so CPU and CUDA actors use the same masks.
    """
    rng = np.random.Generator(np.random.PCG64(key))
    draws = rng.integers(0, 1 << 16, size=(passes, units), dtype=np.uint16)
    return draws >= round(dropout * 65536)


def serfiq_from_passes(embeddings: torch.Tensor) -> torch.Tensor:
    """Quality of each image from its pass embeddings ``(B, m, d)`` (the formula above)."""
    import torch

    x = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    m = x.shape[1]
    gram = x @ x.transpose(1, 2)
    dist = torch.sqrt(torch.clamp(2.0 - 2.0 * gram, min=0.0))
    upper = torch.triu(dist, diagonal=1).sum(dim=(1, 2))
    return 2.0 * torch.sigmoid(-(2.0 / (m * m)) * upper)


def serfiq_numpy(embeddings: np.ndarray) -> float:
    """The same formula for one image's ``(m, d)`` pass embeddings, in numpy."""
    x = np.asarray(embeddings, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    m = len(x)
    gram = np.clip(2.0 - 2.0 * (x @ x.T), 0.0, None)
    upper = np.sqrt(gram)[np.triu_indices(m, 1)].sum()
    return float(2.0 / (1.0 + np.exp((2.0 / (m * m)) * upper)))


def serfiq_qualities(
    net: Any, trunk_out: torch.Tensor, keys: list[int], settings: SerfiqSettings
) -> torch.Tensor:
    """SER-FIQ of each image of a batch from its trunk output (``net.head`` with masks)."""
    import torch

    channels = trunk_out.shape[1]
    spatial = int(np.prod(trunk_out.shape[2:]))
    per_channel = settings.dropout_type == "channel"
    units = channels if per_channel else channels * spatial
    out = torch.empty(len(keys), dtype=torch.float64, device=trunk_out.device)
    for i, key in enumerate(keys):
        keep = torch.from_numpy(keep_masks(key, settings.passes, units, settings.dropout))
        keep = keep.to(trunk_out.device, non_blocking=True)
        if per_channel:
            keep = keep[:, :, None].expand(-1, -1, spatial)
        keep = keep.reshape(settings.passes, *trunk_out.shape[1:])
        passes = net.head(trunk_out[i : i + 1], keep=keep, dropout=settings.dropout)
        out[i] = serfiq_from_passes(passes.float()[None])[0]
    return out
