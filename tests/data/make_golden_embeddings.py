"""Regenerate ``tests/data/golden_demo_embeddings.json`` (run by hand, never by the suite).

    .venv/bin/python tests/data/make_golden_embeddings.py

The embeddings of the ten aligned faces of ``../shared/data/magface_toy`` under the bundled
demo model (``qmag_ray/assets/demo_iresnet.pth``, arch ``iresnet-demo``), computed by the
plain-torch oracle ``tests/model_oracle.py`` (spec model.md), not by the product. Only these
OUTPUT embeddings are committed, never the images. Rerun after a deliberate change of the
asset and commit the new file with the asset.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from model_oracle import backbone_from_checkpoint, iresnet_forward, magface_input  # noqa: E402

ASSET = "qmag_ray/assets/demo_iresnet.pth"
TOY = ROOT.parent / "shared" / "data" / "magface_toy"
OUT = TESTS / "data" / "golden_demo_embeddings.json"
NAMES = [f"{i}.jpg" for i in range(10)]


def main() -> None:
    torch.set_num_threads(1)
    asset = ROOT / ASSET
    state = backbone_from_checkpoint(str(asset))
    blobs = [(TOY / name).read_bytes() for name in NAMES]
    x = torch.from_numpy(np.stack([magface_input(b) for b in blobs]))
    with torch.no_grad():
        emb = iresnet_forward(state, x).numpy()
    record = {
        "command": ".venv/bin/python tests/data/make_golden_embeddings.py",
        "made_by": "tests/model_oracle.py (plain torch from ../shared/spec/model.md)",
        "asset": ASSET,
        "asset_sha256": hashlib.sha256(asset.read_bytes()).hexdigest(),
        "arch": "iresnet-demo",
        "images": "../shared/data/magface_toy",
        "faces": {
            name: {
                "sha256": hashlib.sha256(blob).hexdigest(),
                "embedding": [float(v) for v in row],
            }
            for name, blob, row in zip(NAMES, blobs, emb, strict=True)
        },
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(NAMES)} embeddings of {emb.shape[1]} values")


if __name__ == "__main__":
    main()
