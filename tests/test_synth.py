"""The synthetic face set: determinism, degradation that removes detail, the written layout."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from qmag_ray import storage
from qmag_ray.cli import app
from qmag_ray.synth import (
    SynthSpec,
    degrade,
    iter_images,
    make_identity,
    make_image,
    render_face,
    write_dataset,
)


def _high_pass(img: np.ndarray) -> np.ndarray:
    """Laplacian of the grey image over the face region: the fine detail."""
    g = img.astype(np.float64).mean(axis=2)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return lap[20:-20, 20:-20].ravel()


def test_images_are_deterministic_per_seed_identity_and_index() -> None:
    spec = SynthSpec(identities=3, images_per_identity=2, seed=7)
    first = list(iter_images(spec))
    second = list(iter_images(spec))
    assert [i.identity for i in first] == ["id00000"] * 2 + ["id00001"] * 2 + ["id00002"] * 2
    for a, b in zip(first, second, strict=True):
        assert a.degradation == b.degradation
        assert np.array_equal(a.image, b.image)
        assert a.image.shape == (112, 112, 3) and a.image.dtype == np.uint8
    other = list(iter_images(SynthSpec(identities=3, images_per_identity=2, seed=8)))
    assert not np.array_equal(first[0].image, other[0].image)
    # an image does not depend on the others generated before it
    d, img = make_image(make_identity(7, 2), 7, 2, 1)
    assert d == first[5].degradation and np.array_equal(img, first[5].image)


def test_identity_is_in_geometry_and_texture_not_in_colour() -> None:
    # same nuisance draw, different identities: different faces
    a = render_face(make_identity(0, 0), np.random.default_rng(1))
    b = render_face(make_identity(0, 1), np.random.default_rng(1))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5
    # the mean face colour varies as much within an identity as between identities
    colours, owners = [], []
    for number in range(12):
        ident = make_identity(3, number)
        for k in range(8):
            img = render_face(ident, np.random.default_rng([3, number, k]))
            colours.append(img[40:90, 35:77].reshape(-1, 3).mean(axis=0))
            owners.append(number)
    frame = pd.DataFrame(colours).assign(owner=owners)
    within = frame.groupby("owner").var().mean().mean()
    total = frame.drop(columns="owner").var().mean()
    assert within / total > 0.6


def test_degradation_destroys_fine_detail_monotonically() -> None:
    ident = make_identity(0, 5)
    clean = render_face(ident, np.random.default_rng(0))
    assert np.array_equal(degrade(clean, 0.0, np.random.default_rng(1)), clean)
    levels = np.linspace(0.1, 1.0, 10)
    detail = _high_pass(clean)
    kept = []  # how much of the clean image's fine detail survives, per level
    for d in levels:
        runs = [degrade(clean, float(d), np.random.default_rng(s)) for s in range(6)]
        kept.append(np.mean([np.corrcoef(detail, _high_pass(r))[0, 1] for r in runs]))
    assert kept[0] > 0.6
    assert kept[-1] < 0.1
    rho = pd.Series(levels).corr(pd.Series(kept), method="spearman")
    assert rho < -0.95
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        degrade(clean, 1.5, np.random.default_rng(0))


def test_write_dataset_layout_manifest_and_worker_independence(tmp_path) -> None:
    spec = SynthSpec(identities=4, images_per_identity=3, seed=11)
    one = write_dataset(str(tmp_path / "a"), spec, workers=1)
    two = write_dataset(str(tmp_path / "b"), spec, workers=2, chunk=1)
    assert list(one.columns) == ["path", "identity", "degradation", "pose", "pose_band"]
    # the group attribute: the drawn in-plane rotation and its band (thresholds 0.04, 0.08)
    assert one["pose"].abs().max() <= 0.12
    bands = np.where(
        one["pose"].abs() < 0.04, "upright", np.where(one["pose"].abs() < 0.08, "tilted", "strong")
    )
    assert (one["pose_band"] == bands).all()
    assert len(one) == 12 and one["identity"].nunique() == 4
    assert one["degradation"].between(0, 1).all()
    written = pd.read_parquet(tmp_path / "a" / "manifest.parquet")
    pd.testing.assert_frame_equal(written, one)
    pd.testing.assert_frame_equal(two, one)
    for rel in one["path"]:
        assert rel.split("/")[0] in set(one["identity"])
        data_a = (tmp_path / "a" / rel).read_bytes()
        assert data_a == (tmp_path / "b" / rel).read_bytes()
        assert Image.open(io.BytesIO(data_a)).size == (112, 112)
    assert (tmp_path / "a" / "synth.json").exists()


@pytest.mark.s3
def test_write_dataset_to_s3(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/synth"
    manifest = write_dataset(uri, SynthSpec(identities=2, images_per_identity=2, seed=1))
    read = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{uri}/manifest.parquet")))
    pd.testing.assert_frame_equal(read, manifest)
    img = Image.open(io.BytesIO(storage.read_bytes(f"{uri}/{manifest['path'][3]}")))
    assert img.size == (112, 112)


def test_cli_synth(tmp_path) -> None:
    out = tmp_path / "set"
    result = CliRunner().invoke(
        app,
        [
            "synth",
            "--output",
            str(out),
            "--identities",
            "3",
            "--images-per-identity",
            "2",
            "--seed",
            "5",
            "--workers",
            "1",
            "--max-degradation",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 6 and manifest["degradation"].max() <= 0.5
    bad = CliRunner().invoke(app, ["synth", "--output", str(out), "--identities", "0"])
    assert bad.exit_code == 2, bad.output  # a user error, not a crash (1) or a traceback
    assert "--identities" in bad.output and isinstance(bad.exception, SystemExit)
