"""The iResNet backbones and their registry: structure facts a MagFace checkpoint relies on."""

from __future__ import annotations

import pytest
import torch
from fresh_interpreter import modules_loaded_after
from torch import nn

from qmag_ray.model import (
    IResNet,
    backbone_names,
    canonical_name,
    create_backbone,
    register_backbone,
)

# Trainable parameters and state_dict entries of MagFace's networks.
FACTS = {
    "iresnet18": (24_025_600, 187),
    "iresnet34": (34_139_328, 331),
    "iresnet50": (43_590_848, 475),
    "iresnet100": (65_156_160, 925),
}


@pytest.mark.parametrize("name", list(FACTS))
def test_parameter_and_state_dict_counts(name: str) -> None:
    model = create_backbone(name)
    n_params, n_entries = FACTS[name]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_params
    assert len(model.state_dict()) == n_entries
    assert model.embedding_size == 512
    assert model.input_size == 112


@pytest.mark.parametrize("name", [*FACTS, "iresnet-demo"])
def test_every_batchnorm_uses_magface_eps_and_momentum(name: str) -> None:
    with torch.device("meta"):
        model = create_backbone(name)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms, "no BatchNorm found"
    assert {m.eps for m in norms} == {2e-5}
    assert {m.momentum for m in norms} == {0.1}  # MagFace's 0.9 in MXNet's convention


def test_key_names_follow_magface() -> None:
    keys = set(create_backbone("iresnet18").state_dict())
    top = {key.split(".")[0] for key in keys}
    assert top == {"conv1", "bn1", "prelu", "layer1", "layer2", "layer3", "layer4"} | {
        "bn2",
        "fc",
        "features",
    }
    assert {"features.weight", "features.running_var", "fc.weight", "fc.bias"} <= keys
    assert "conv1.bias" not in keys
    block = {k[len("layer1.0.") :] for k in keys if k.startswith("layer1.0.")}
    assert {"bn1.weight", "conv1.weight", "bn2.weight", "prelu.weight", "conv2.weight"} <= block
    assert {"bn3.running_mean", "downsample.0.weight", "downsample.1.running_var"} <= block
    assert "downsample.0.bias" not in block
    assert not any(k.startswith("layer1.1.downsample") for k in keys)
    model = create_backbone("iresnet18")
    assert model.fc.in_features == 512 * 7 * 7 and model.fc.bias is not None
    assert model.layer1[0].conv2.stride == (2, 2) and model.layer1[0].conv1.stride == (1, 1)


def test_iresnet18_forward_gives_512_d_embeddings() -> None:
    torch.manual_seed(0)
    model = create_backbone("iresnet18").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_demo_backbone_is_small_and_takes_112x112() -> None:
    torch.manual_seed(0)
    model = create_backbone("iresnet-demo").eval()
    assert isinstance(model, IResNet)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.embedding_size == 128 and model.input_size == 112
    assert set(create_backbone("iresnet18").state_dict()) >= set(model.state_dict())
    with torch.no_grad():
        assert model(torch.rand(3, 3, 112, 112)).shape == (3, 128)
    with pytest.raises(ValueError, match="112"):
        model(torch.rand(1, 3, 96, 96))


def test_dropout_is_identity_in_eval_only() -> None:
    torch.manual_seed(0)
    model = create_backbone("iresnet-demo", embedding_size=16)
    x = torch.rand(4, 3, 112, 112)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_names_are_normalised() -> None:
    assert canonical_name("iResNet-100") == canonical_name("iresnet_100") == "iresnet100"
    assert canonical_name("IRESNET_DEMO") == "iresnet-demo"
    a = create_backbone("iResNet-18")
    assert isinstance(a, IResNet) and a.layers == (2, 2, 2, 2)
    assert create_backbone("iresnet-demo", embedding_size=32).embedding_size == 32
    assert {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet-demo"} <= set(
        backbone_names()
    )


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError) as info:
        create_backbone("resnet-101")
    message = str(info.value)
    assert "resnet-101" in message
    for name in ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet-demo"):
        assert name in message


def test_a_clashing_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="iresnet18"):
        register_backbone("iResNet_18")(lambda **kw: IResNet((1, 1, 1, 1), **kw))


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import qmag_ray.model as m; assert 'iresnet100' in m.backbone_names()"
    assert modules_loaded_after("import qmag_ray", ["torch"]) == {"torch": False}
    assert modules_loaded_after(code, ["qmag_ray.model"]) == {"qmag_ray.model": True}
