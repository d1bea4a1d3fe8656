"""The MagFace loss (Meng et al., CVPR 2021): a magnitude-aware angular margin and regulariser.

For a feature ``x`` with magnitude ``a = clamp(||x||, l_a, u_a)`` and label ``y``::

    m(a) = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a)          (margin, increasing in a)
    g(a) = 1 / a + a / u_a**2                                  (regulariser, minimal at u_a)
    L    = -log(e^{s cos(t_y + m(a))} / (e^{s cos(t_y + m(a))} + sum_{j != y} e^{s cos t_j}))
           + lambda_g g(a)

with ``cos t_j`` the cosine between ``x`` and the normalised class weight ``w_j``. The larger
margin at large magnitude makes only easy (high-quality) samples afford a large norm, so the
magnitude becomes a quality measure. As in ArcFace (and MagFace's code), where ``t_y + m``
would pass ``pi`` the target logit is ``cos t_y - m sin(m)`` instead, which keeps it decreasing
in ``t_y``. Defaults are the paper's hyper-parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qmag_ray.training.config import MagFaceParams  # noqa: F401  (declared with the settings)

_EPS = 1e-7


def magnitude(x: torch.Tensor, p: MagFaceParams) -> torch.Tensor:
    """Feature magnitudes ``a`` clamped to ``[l_a, u_a]``, shape (N,)."""
    return torch.linalg.vector_norm(x, dim=1).clamp(p.l_a, p.u_a)


def margin(a: torch.Tensor, p: MagFaceParams) -> torch.Tensor:
    """The magnitude-aware margin ``m(a)``, linear from ``l_m`` at ``l_a`` to ``u_m`` at ``u_a``."""
    return p.l_m + (p.u_m - p.l_m) * (a - p.l_a) / (p.u_a - p.l_a)


def regulariser(a: torch.Tensor, p: MagFaceParams) -> torch.Tensor:
    """The magnitude regulariser ``g(a) = 1/a + a/u_a^2`` (convex, minimal at ``a = u_a``)."""
    return 1.0 / a + a / (p.u_a**2)


def magface_logits(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, p: MagFaceParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled logits with the margin on the target class, plain cosines and magnitudes.

    Args:
        x: features (N, D), not normalised.
        weight: class weights (D, C) (MagFace's layout: embedding size x classes).
        labels: class indices (N,).

    Returns:
        ``(logits (N, C), cos (N, C), a (N,))``.
    """
    a = magnitude(x, p)
    cos = (F.normalize(x, dim=1) @ F.normalize(weight, dim=0)).clamp(-1 + _EPS, 1 - _EPS)
    m = margin(a, p).unsqueeze(1)
    target = cos.gather(1, labels.unsqueeze(1))
    sin = torch.sqrt((1.0 - target * target).clamp_min(_EPS))
    target_m = target * torch.cos(m) - sin * torch.sin(m)
    # past theta + m = pi, cos(theta + m) would rise again: continue it linearly instead
    threshold = torch.cos(math.pi - m)
    target_m = torch.where(target > threshold, target_m, target - m * torch.sin(m))
    logits = cos.scatter(1, labels.unsqueeze(1), target_m) * p.scale
    return logits, cos, a


def magface_loss(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, p: MagFaceParams
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean MagFace loss over the batch and its parts (``id``, ``g``, ``acc``, ``norm``)."""
    logits, cos, a = magface_logits(x, weight, labels, p)
    loss_id = F.cross_entropy(logits, labels)
    loss_g = regulariser(a, p).mean()
    loss = loss_id + p.lambda_g * loss_g
    with torch.no_grad():
        acc = (cos.argmax(dim=1) == labels).float().mean()
        parts = {
            "id": loss_id.detach(),
            "g": loss_g.detach(),
            "acc": acc,
            "norm": torch.linalg.vector_norm(x.detach(), dim=1).mean(),
        }
    return loss, parts


class MagFaceHead(nn.Module):
    """The training classifier: one weight column per class, stored as MagFace's ``fc.weight``."""

    def __init__(self, embedding_size: int, num_classes: int, params: MagFaceParams) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"MagFace training needs at least 2 classes, got {num_classes}")
        self.params = params
        self.weight = nn.Parameter(torch.empty(embedding_size, num_classes))
        nn.init.uniform_(self.weight, -1, 1)
        with torch.no_grad():
            self.weight.copy_(F.normalize(self.weight, dim=0))

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return magface_loss(x, self.weight, labels, self.params)
