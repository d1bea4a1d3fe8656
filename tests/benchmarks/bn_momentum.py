"""Measurement behind the BatchNorm momentum default (README "Training parity").

Run by hand::

    .venv/bin/python tests/benchmarks/bn_momentum.py --data /tmp/qs/train-s1 --batches 20

torch's BatchNorm momentum is the weight of the NEW batch (running = (1 - m) running + m batch);
MagFace's trainer passes 0.9 to torch. The script starts from the bundled demo model, resets
every BatchNorm's running statistics, streams ``--batches`` training batches through the
network in train mode (no gradient step, so only the statistics move) with momentum 0.1, 0.9
and None (torch's cumulative average: the population statistics of all batches), then
compares the eval-mode embeddings of held-out images under each against the cumulative ones:
the relative embedding error and the error of the embedding norm (the MagFace quality).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qmag_ray.images import decode_face, to_input
from qmag_ray.model.checkpoint import load_backbone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="a synth set (manifest.parquet)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--held", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    manifest = pd.read_parquet(f"{args.data}/manifest.parquet").sample(frac=1.0, random_state=0)
    paths = manifest["path"].tolist()
    need = args.batches * args.batch_size
    faces = np.stack(
        [decode_face(Path(f"{args.data}/{p}").read_bytes()) for p in paths[: need + args.held]]
    )
    train, held = faces[:need], torch.from_numpy(to_input(faces[need:]))
    base = load_backbone("qmag_ray/assets/demo_iresnet.pth", "iresnet-demo")
    out = {}
    for momentum in (None, 0.1, 0.9):
        net = copy.deepcopy(base)
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = momentum
        net.train()
        with torch.no_grad():
            for k in range(args.batches):
                x = torch.from_numpy(
                    to_input(train[k * args.batch_size : (k + 1) * args.batch_size])
                )
                net(x)
            net.eval()
            out[momentum] = net(held).double().numpy()
    ref = out[None]
    for momentum in (0.1, 0.9):
        e = out[momentum]
        rel = np.linalg.norm(e - ref, axis=1) / np.linalg.norm(ref, axis=1)
        norm_err = np.abs(np.linalg.norm(e, axis=1) - np.linalg.norm(ref, axis=1)) / np.linalg.norm(
            ref, axis=1
        )
        cos = np.sum(e * ref, axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))
        print(
            f"momentum {momentum}: embedding error vs population stats {100 * rel.mean():.2f}% "
            f"(median {100 * np.median(rel):.2f}%), norm error {100 * norm_err.mean():.2f}%, "
            f"mean cosine {cos.mean():.5f} ({args.batches} batches of {args.batch_size})"
        )


if __name__ == "__main__":
    main()
