"""Training-step parity between two trees of qmag-ray (not a test).

Runs ``STEPS`` SGD steps of the library's MagFace fine-tune (``build_net``, ``train_step``;
batch 64, random flips, seed 0, one torch thread) from ``MODEL`` on a synthetic set and prints
the losses and a sha256 over every parameter and buffer of the network and margin head. Run it
with ``PYTHONPATH`` pointing at each tree; equal digests mean the two trees train bit for bit
alike (e.g. before and after the training options ``--bn-momentum``/``--dropout-type``)::

    mkdir /tmp/oldtrain && git archive 68c37e7^ | tar -x -C /tmp/oldtrain
    for tree in /tmp/oldtrain $PWD; do
        PYTHONPATH=$tree .venv/bin/python tests/benchmarks/train_parity.py DATA MODEL 4 0
    done
"""

from __future__ import annotations

import hashlib
import sys

import torch

import qmag_ray
from qmag_ray.training.config import TrainConfig
from qmag_ray.training.data import FaceDataset, collate, list_labelled_images
from qmag_ray.training.loop import build_net, lr_factor, make_optimizer, train_step


def main() -> None:
    data, model, steps, dropout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = TrainConfig(
        data=data,
        output="/tmp/parity-out",
        init_checkpoint=model,
        lr=0.01,
        dropout=dropout,
        seed=0,
        batch_size=64,
    )
    images = list_labelled_images(cfg.data)
    loader = torch.utils.data.DataLoader(
        FaceDataset(images, flip=True, seed=0),
        batch_size=64,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    net = build_net(cfg, images.num_classes)
    opt = make_optimizer(cfg, net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 2, steps))
    losses = []
    for step, (x, y, _) in enumerate(loader):
        if step >= steps:
            break
        losses.append(round(train_step(net, opt, sched, x, y)["loss"], 6))
    digest = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    print(qmag_ray.__file__, "dropout", dropout, "losses", losses, digest.hexdigest()[:16])


if __name__ == "__main__":
    main()
