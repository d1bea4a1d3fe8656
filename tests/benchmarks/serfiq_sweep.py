"""SER-FIQ settings on one model: dropout rate, dropout type and number of passes (not a test).

Decodes a synthetic set (``qmag-ray synth`` output with its ``manifest.parquet``), runs the
trunk once, then the head's SER-FIQ passes (``serfiq_qualities``, the embed actor's code) for
each setting, and prints Spearman(SER-FIQ, degradation) and Spearman(SER-FIQ, norm) next to
Spearman(norm, degradation). In process, one torch thread::

    .venv/bin/python tests/benchmarks/serfiq_sweep.py EVAL_SET [MODEL.pth [N_SETTINGS]]
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial

import numpy as np
import torch
from scipy.stats import spearmanr
from serfiq_eval import decode_set, degradation_spearman, in_batches

from qmag_ray.embedding.actor import to_input
from qmag_ray.model.checkpoint import load_backbone
from qmag_ray.quality.serfiq import SerfiqSettings, image_key, serfiq_qualities

SETTINGS = [
    (0.5, "element", 100),
    (0.2, "element", 100),
    (0.8, "element", 100),
    (0.5, "channel", 100),
    (0.5, "element", 20),
]


def main() -> None:
    torch.set_num_threads(1)
    root = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else "qmag_ray/assets/demo_iresnet.pth"
    n_settings = int(sys.argv[3]) if len(sys.argv) > 3 else len(SETTINGS)
    man, batch = decode_set(root)
    net = load_backbone(model, "iresnet-demo", device="cpu").eval()
    x = torch.from_numpy(to_input(np.asarray(batch["image"])))
    with torch.inference_mode():
        trunk = in_batches(net.trunk, x)
        norm = in_batches(net.head, trunk).norm(dim=1).numpy()
    d = man["degradation"].to_numpy()
    print(f"Spearman(norm, degradation) {degradation_spearman(d, norm=norm)['norm']:.3f}")
    keys = [image_key(0, str(p)) for p in man["path"]]
    for p, kind, m in SETTINGS[:n_settings]:
        began = time.process_time()
        settings = SerfiqSettings(m, p, 0, kind)
        with torch.inference_mode():
            q = in_batches(partial(serfiq_qualities, net, settings=settings), trunk, keys).numpy()
        row = {
            "p": p,
            "type": kind,
            "passes": m,
            "spearman_degradation": degradation_spearman(d, serfiq=q)["serfiq"],
            "spearman_norm": round(float(spearmanr(q, norm).correlation), 3),
            "serfiq_mean": round(float(q.mean()), 4),
            "serfiq_std": round(float(q.std()), 5),
            "cpu_s": round(time.process_time() - began, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
