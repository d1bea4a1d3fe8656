"""The network pinned from outside the product: golden embeddings and a plain-torch oracle.

- The bundled demo model on the ten toy faces must give the committed golden embeddings
  (``tests/data/golden_demo_embeddings.json``, made by ``tests/data/make_golden_embeddings.py``
  with the oracle of ``model_oracle.py``), within 1e-5, and the asset must be the one they were
  made from (sha256).
- iResNet-18/50/100 with weights that depend only on the parameter name must give the output
  of ``model_oracle.iresnet_forward``, the spec's forward written with ``torch.nn.functional``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from model_oracle import (
    LAYERS,
    backbone_from_checkpoint,
    iresnet_forward,
    iresnet_shapes,
    keyed_state,
    magface_input,
)
from shared_gate import need_shared

from qmag_ray.images import decode_face, to_input
from qmag_ray.model import create_backbone, load_backbone

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "qmag_ray" / "assets" / "demo_iresnet.pth"
GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_demo_embeddings.json").read_text())
REGENERATE = "regenerate with `.venv/bin/python tests/data/make_golden_embeddings.py`"


def toy_faces() -> dict[str, bytes]:
    """The ten toy faces (skips without ../shared, fails under CI=true: ``need_shared``)."""
    toy = need_shared("magface_toy")
    faces = {name: (toy / name).read_bytes() for name in GOLDEN["faces"]}
    for name, blob in faces.items():
        assert hashlib.sha256(blob).hexdigest() == GOLDEN["faces"][name]["sha256"], (
            f"{toy / name} is not the face the golden embeddings were made from"
        )
    return faces


def golden_matrix() -> np.ndarray:
    return np.array([face["embedding"] for face in GOLDEN["faces"].values()], np.float32)


def test_demo_asset_is_the_one_the_golden_embeddings_were_made_from() -> None:
    digest = hashlib.sha256(ASSET.read_bytes()).hexdigest()
    assert digest == GOLDEN["asset_sha256"], f"{ASSET} changed: {REGENERATE}"
    meta = json.loads(ASSET.with_suffix(".json").read_text())
    assert meta["sha256"] == digest
    assert golden_matrix().shape == (10, 128)


def test_demo_model_gives_the_golden_embeddings() -> None:
    faces = toy_faces()
    model = load_backbone(str(ASSET), "iresnet-demo").eval()
    batch = np.stack([decode_face(blob) for blob in faces.values()])
    with torch.inference_mode():
        got = model(torch.from_numpy(to_input(batch))).numpy()
    want = golden_matrix()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # The quality (norm) differs between faces: a constant output would not pass either.
    norms = np.linalg.norm(want, axis=1)
    assert norms.max() - norms.min() > 1.0


def test_golden_embeddings_are_the_oracle_output() -> None:
    """The committed file is what the oracle gives today (it was not made by the product)."""
    faces = toy_faces()
    x = torch.from_numpy(np.stack([magface_input(b) for b in faces.values()]))
    with torch.no_grad():
        got = iresnet_forward(backbone_from_checkpoint(str(ASSET)), x).numpy()
    np.testing.assert_allclose(got, golden_matrix(), rtol=0, atol=1e-5)


def test_product_preprocessing_is_bgr_over_255() -> None:
    """The product's decode + to_input equal the spec's convention on a coloured image."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "PNG")
    got = to_input(decode_face(buf.getvalue())[None])[0]
    want = rgb[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(magface_input(buf.getvalue()), want)


@pytest.mark.parametrize("arch", ["iresnet18", "iresnet50", "iresnet100"])
def test_iresnet_equals_the_plain_forward_of_the_spec(arch: str) -> None:
    state = keyed_state(iresnet_shapes(LAYERS[arch]))
    model = create_backbone(arch).eval()
    # strict: the product's names and shapes are exactly the spec's (num_batches_tracked aside)
    model.load_state_dict(state, strict=True)
    x = torch.rand((2, 3, 112, 112), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        got = model(x)
        want = iresnet_forward(state, x)
    assert got.shape == (2, 512)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    # Two different faces give different embeddings (the test cannot pass on a constant).
    assert float((want[0] - want[1]).abs().max()) > 1e-3 * scale
