"""The backbone options that training parity with MagFace's trainer depends on: BatchNorm
momentum in torch's convention and the head's dropout type."""

from __future__ import annotations

import pytest
import torch

from qmag_ray.model import create_backbone
from qmag_ray.training.config import TrainConfig, backbone_kwargs


def test_bn_momentum_is_torchs_weight_of_the_new_batch():
    # one train-mode batch whose first-BN input has channel mean 3 (constant images of 3):
    # running = (1 - m) * 0 + m * 3 -> 0.3 with m = 0.1, 2.7 with MagFace's 0.9
    for momentum, expected in ((0.1, 0.3), (0.9, 2.7)):
        net = create_backbone("iresnet-demo", bn_momentum=momentum).train()
        with torch.no_grad():
            net.conv1.weight.zero_()
            net.conv1.weight[:, 0, 1, 1] = 1.0  # channel 0 of the image, centre tap
            net(torch.full((4, 3, 112, 112), 3.0))
        assert net.bn1.running_mean[0].item() == pytest.approx(expected, abs=1e-5)


def test_channel_dropout_drops_whole_channels_and_element_dropout_does_not():
    torch.manual_seed(0)
    x = torch.ones(2, 64, 7, 7)
    channel = create_backbone("iresnet-demo", dropout=0.5, dropout_type="channel").train()
    y = channel.dropout(x)
    per_channel = y.reshape(2, 64, -1)
    assert ((per_channel == 0).all(-1) | (per_channel == 2).all(-1)).all()
    element = create_backbone("iresnet-demo", dropout=0.5).train()
    z = element.dropout(x).reshape(2, 64, -1)
    assert not ((z == 0).all(-1) | (z == 2).all(-1)).all()
    with pytest.raises(ValueError, match="dropout_type"):
        create_backbone("iresnet-demo", dropout_type="spatial")


def test_train_config_passes_the_options_to_the_backbone(tmp_path):
    cfg = TrainConfig(data="d", output="o", dropout=0.4, dropout_type="channel", bn_momentum=0.9)
    kwargs = backbone_kwargs(cfg)
    assert kwargs == {"dropout": 0.4, "dropout_type": "channel", "bn_momentum": 0.9}
    net = create_backbone("iresnet-demo", **kwargs)
    assert isinstance(net.dropout, torch.nn.Dropout2d) and net.bn1.momentum == 0.9
    # defaults: what the bundled demo model was trained with
    assert backbone_kwargs(TrainConfig(data="d", output="o")) == {
        "dropout_type": "element",
        "bn_momentum": 0.1,
    }
    with pytest.raises(ValueError, match="bn_momentum"):
        TrainConfig(data="d", output="o", bn_momentum=0.0)
