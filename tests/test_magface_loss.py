"""The MagFace loss: margin and regulariser, gradients on the magnitude, a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from qmag_ray.training.magface import (
    MagFaceHead,
    MagFaceParams,
    magface_logits,
    magface_loss,
    magnitude,
    margin,
    regulariser,
)

P = MagFaceParams()


def test_paper_defaults() -> None:
    assert (P.l_a, P.u_a, P.l_m, P.u_m, P.lambda_g, P.scale) == (10, 110, 0.45, 0.8, 35, 64)


def test_margin_is_linear_and_increasing_in_the_magnitude() -> None:
    a = torch.linspace(P.l_a, P.u_a, 101, dtype=torch.float64)
    m = margin(a, P)
    assert m[0].item() == pytest.approx(P.l_m)
    assert m[-1].item() == pytest.approx(P.u_m)
    assert torch.all(torch.diff(m) > 0)
    assert m[50].item() == pytest.approx((P.l_m + P.u_m) / 2)


def test_magnitude_is_clamped_to_the_bounds() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 50.0], [300.0, 400.0]])
    assert magnitude(x, P).tolist() == pytest.approx([10.0, 50.0, 110.0])


def test_regulariser_gradient_pushes_norms_up_below_u_a() -> None:
    a = torch.linspace(P.l_a, P.u_a - 1, 50, dtype=torch.float64, requires_grad=True)
    regulariser(a, P).sum().backward()
    assert torch.all(a.grad < 0)  # gradient descent increases a
    top = torch.tensor(P.u_a, dtype=torch.float64, requires_grad=True)
    regulariser(top, P).backward()
    assert top.grad.item() == pytest.approx(0.0, abs=1e-12)  # g is minimal at u_a


def _two_class_weight() -> torch.Tensor:
    return torch.eye(2, dtype=torch.float64)  # (D=2, C=2): class j along axis j


def _norm_gradient(angle: float, norm: float) -> float:
    """d loss / d ||x|| for a feature at ``angle`` from its class (class 0) and ``norm``."""
    r = torch.tensor(norm, dtype=torch.float64, requires_grad=True)
    x = torch.stack([r * math.cos(angle), r * math.sin(angle)]).unsqueeze(0)
    loss, _ = magface_loss(x, _two_class_weight(), torch.tensor([0]), P)
    loss.backward()
    return float(r.grad)


def test_easy_samples_are_pushed_to_larger_norms_and_hard_ones_to_smaller() -> None:
    for norm in (15.0, 40.0, 80.0):
        assert _norm_gradient(0.05, norm) < 0  # easy: close to its class centre
        assert _norm_gradient(1.45, norm) > 0  # hard: nearly orthogonal, close to the other


def test_loss_equals_a_hand_computed_value() -> None:
    a, phi = 20.0, 0.3
    x = torch.tensor([[a * math.cos(phi), a * math.sin(phi)]], dtype=torch.float64)
    loss, parts = magface_loss(x, _two_class_weight(), torch.tensor([0]), P)
    m = 0.45 + (0.8 - 0.45) * (20 - 10) / (110 - 10)
    target = 64 * math.cos(phi + m)
    other = 64 * math.cos(math.pi / 2 - phi)
    loss_id = -math.log(math.exp(target) / (math.exp(target) + math.exp(other)))
    g = 1 / 20 + 20 / 110**2
    assert parts["id"].item() == pytest.approx(loss_id, rel=1e-9)
    assert parts["g"].item() == pytest.approx(g, rel=1e-9)
    assert loss.item() == pytest.approx(loss_id + 35 * g, rel=1e-9)
    assert parts["acc"].item() == 1.0
    assert parts["norm"].item() == pytest.approx(20.0)


def test_target_logit_decreases_in_the_angle_over_the_whole_range() -> None:
    angles = torch.linspace(0.0, math.pi, 400, dtype=torch.float64)
    x = torch.stack([30 * torch.cos(angles), 30 * torch.sin(angles)], dim=1)
    logits, _, _ = magface_logits(x, _two_class_weight(), torch.zeros(400, dtype=torch.long), P)
    assert torch.all(torch.diff(logits[:, 0]) < 0)  # also past theta + m = pi


def test_loss_is_finite_with_gradients_for_extreme_features() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    x[0] = 0.0  # a zero feature
    x[1] *= 1e4  # far above u_a
    x[2] *= 1e-6  # far below l_a
    x.requires_grad_(True)
    weight = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    weight[:, 3] = weight[:, 1]  # two identical class centres
    loss, parts = magface_loss(x, weight, torch.tensor([0, 1, 2, 3, 4, 1]), P)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in parts.values())
    assert torch.all(torch.isfinite(x.grad))


def test_head_stores_magface_layout_weight_and_validates_classes() -> None:
    head = MagFaceHead(128, 7, P)
    assert tuple(head.weight.shape) == (128, 7)  # MagFace's fc.weight: embedding x classes
    assert torch.allclose(head.weight.norm(dim=0), torch.ones(7))
    loss, _ = head(torch.randn(4, 128) * 20, torch.tensor([0, 1, 2, 6]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="at least 2 classes"):
        MagFaceHead(128, 1, P)
    with pytest.raises(ValueError, match="l_a. < .u_a"):
        MagFaceParams(l_a=50, u_a=20)
