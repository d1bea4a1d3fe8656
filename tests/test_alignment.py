"""Five-point alignment onto the ArcFace template, in decoding and in the embedding job.

The reference is written here: Umeyama's closed-form similarity (plain numpy) and a plain
bilinear sampler with a black border. Faces are synthetic renderings placed into real-sized
loose crops (300x250) by a known similarity transform that also moves their landmarks.

Against that float64 sampler OpenCV differs by up to a few grey levels on the renderings'
sharpest edges: ``warpAffine`` rounds every sample position to 1/32 pixel (INTER_BITS = 5) and
its bilinear weights to 15-bit fixed point. The alignment IS OpenCV's warp, so on real-sized
crops (250x250) it is checked against the standard OpenCV reference written here:
``cv2.estimateAffinePartial2D`` or Umeyama (skimage's ``SimilarityTransform``) plus
``cv2.warpAffine``, at most one grey level apart everywhere.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qmag_ray.alignment import LandmarkError, align_face, similarity_transform
from qmag_ray.embedding import EmbedConfig, EmbedError, run_embed
from qmag_ray.embedding.inputs import (
    LandmarkTable,
    manifest_landmarks,
    read_and_decode,
    read_landmark_file,
)
from qmag_ray.images import decode, to_input
from qmag_ray.model import create_backbone, save_checkpoint
from qmag_ray.synth import make_identity, make_image

# ArcFace 112x112 template, typed in again from its publication (not imported)
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]]
)  # fmt: skip


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Umeyama (1991): the similarity x -> s R x + t of least squared error, as a 2x3 matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, d, vt = np.linalg.svd(b.T @ a / len(src))
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / a.var(0).sum()
    return np.c_[scale * rot, mu_d - scale * rot @ mu_s]


def warp(image: np.ndarray, forward: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """out[y, x] = bilinear sample of ``image`` at forward^-1 (x, y); black outside it."""
    inv = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    h, w = image.shape[:2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]

    def px(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
        return image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].astype(np.float64) * inside

    top = px(y0, x0) * (1 - fx) + px(y0, x0 + 1) * fx
    bottom = px(y0 + 1, x0) * (1 - fx) + px(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def loose_crop(
    seed: int,
    angle: float,
    scale: float,
    shift: tuple[float, float],
    shape: tuple[int, int] = (300, 250),
):
    """(``shape`` BGR crop, its five landmarks, the 112x112 face it holds)."""
    _, rgb = make_image(make_identity(seed, 0), seed, 0, 0, max_d=0.0)
    face = np.ascontiguousarray(rgb[:, :, ::-1])
    c, s = np.cos(np.radians(angle)) * scale, np.sin(np.radians(angle)) * scale
    forward = np.array([[c, -s, shift[0]], [s, c, shift[1]]])
    crop = np.clip(np.rint(warp(face, forward, shape)), 0, 255).astype(np.uint8)
    landmarks = TEMPLATE @ forward[:, :2].T + forward[:, 2]
    return crop, landmarks, face


def encode(bgr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(bgr[:, :, ::-1]).save(buf, format=fmt)
    return buf.getvalue()


CASES = [(1, 12.0, 1.6, (60.0, 40.0)), (2, -25.0, 1.35, (40.0, 110.0)), (3, 3.0, 1.8, (25.0, 40.0))]


@pytest.mark.parametrize(("seed", "angle", "scale", "shift"), CASES)
def test_alignment_equals_the_reference_within_one_grey_level(seed, angle, scale, shift) -> None:
    import cv2

    crop, lm, face = loose_crop(seed, angle, scale, shift)
    noisy = lm + np.random.default_rng(seed).normal(0, 1.5, lm.shape)  # a detector's noise
    np.testing.assert_allclose(similarity_transform(noisy), umeyama(noisy, TEMPLATE), atol=1e-9)
    ref_matrix = umeyama(noisy, TEMPLATE)
    # a camera-like crop (the renderings' edges are sharper than a photograph's): within one
    # grey level everywhere
    soft = cv2.GaussianBlur(crop, (0, 0), 1.0)
    ours = align_face(soft, noisy).astype(np.int16)
    ref = np.clip(np.rint(warp(soft, ref_matrix, (112, 112))), 0, 255).astype(np.int16)
    assert np.abs(ours - ref).max() <= 1
    # the raw rendering, with steps of up to ~100 grey levels between neighbouring pixels:
    # OpenCV computes sample positions in 1/32-pixel fixed point, which moves a value on such
    # an edge by up to a few grey levels; all but a handful of values are within one
    ours = align_face(crop, noisy).astype(np.int16)
    ref = np.clip(np.rint(warp(crop, ref_matrix, (112, 112))), 0, 255).astype(np.int16)
    diff = np.abs(ours - ref)
    assert (diff <= 1).mean() >= 0.999 and diff.max() <= 3
    # exact landmarks bring the original face back (up to two resamplings)
    back = align_face(crop, lm).astype(np.float64)
    inner = (slice(8, 104), slice(8, 104))
    assert np.abs(back[inner] - face[inner]).mean() < 4.0


REAL_SIZED = [
    (6, 12.0, 1.6, (60.0, 40.0)),
    (7, -25.0, 1.35, (40.0, 110.0)),
    (8, 3.0, 1.8, (25.0, 40.0)),
    (9, 33.0, 1.5, (120.0, 20.0)),
    (10, -8.0, 2.0, (10.0, 15.0)),
]


def cv2_reference(image: np.ndarray, landmarks: np.ndarray, how: str) -> np.ndarray:
    """The standard alignment as OpenCV users write it: the similarity from
    ``cv2.estimateAffinePartial2D`` (least squares refined on all five points) or Umeyama's
    closed form (skimage's ``SimilarityTransform.estimate``), then ``cv2.warpAffine``."""
    import cv2

    if how == "estimateAffinePartial2D":
        matrix, inliers = cv2.estimateAffinePartial2D(
            landmarks.astype(np.float64),
            TEMPLATE.astype(np.float64),
            method=cv2.RANSAC,
            ransacReprojThreshold=1e6,  # every point an inlier: refined on all five
            refineIters=100,
        )
        assert matrix is not None and inliers.all()
    else:
        matrix = umeyama(landmarks, TEMPLATE)
    return cv2.warpAffine(
        image, matrix, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )  # fmt: skip


@pytest.mark.parametrize("how", ["estimateAffinePartial2D", "umeyama"])
@pytest.mark.parametrize(("seed", "angle", "scale", "shift"), REAL_SIZED)
def test_real_sized_crops_equal_an_opencv_reference_within_one_grey_level(
    seed, angle, scale, shift, how
) -> None:
    # 250x250 loose crops (the size of LFW's and most detectors' crops) straight from the
    # renderer, with its sharp edges, and the same crops after a JPEG round trip
    crop, lm, _ = loose_crop(seed, angle, scale, shift, (250, 250))
    assert ((lm >= 0) & (lm < 250)).all()
    noisy = lm + np.random.default_rng(seed).normal(0, 1.5, lm.shape)  # a detector's noise
    ours = align_face(crop, noisy).astype(np.int16)
    ref = cv2_reference(crop, noisy, how).astype(np.int16)
    assert np.abs(ours - ref).max() <= 1
    # through the embed job's decoding (a JPEG file, aligned in decode)
    data = encode(crop, "JPEG")
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[:, :, ::-1]
    ours = decode(data, landmarks=noisy).image.astype(np.int16)
    ref = cv2_reference(np.ascontiguousarray(pixels), noisy, how).astype(np.int16)
    assert np.abs(ours - ref).max() <= 1
    # the landmarks of the aligned face land on the template
    np.testing.assert_allclose(
        TEMPLATE, lm @ similarity_transform(lm)[:, :2].T + similarity_transform(lm)[:, 2],
        atol=1e-6,
    )  # fmt: skip


def test_flip_with_serfiq_is_refused_before_ray_starts(tmp_path: Path, monkeypatch) -> None:
    import ray
    from typer.testing import CliRunner

    from qmag_ray import runtime
    from qmag_ray.cli.app import app

    def no_ray(*_a, **_k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "connect_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    (tmp_path / "images").mkdir()
    args = ["embed", "--images", str(tmp_path / "images"), "--model", str(tmp_path / "m.pth")]
    args += ["--arch", "iresnet-demo", "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--flip", "--quality", "serfiq"])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) <= 2 and "Traceback" not in result.output
    assert "--flip" in result.output and "--quality serfiq" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--flip cannot be combined with --quality serfiq"):
        EmbedConfig(images="i", model="m", arch="iresnet-demo", output="o", flip=True,
                    quality="serfiq")  # fmt: skip


def test_decode_aligns_any_size_and_bad_landmarks_fail_per_image(tmp_path: Path) -> None:
    crop, lm, _ = loose_crop(4, 8.0, 1.7, (50.0, 50.0))
    out = decode(encode(crop), landmarks=lm)
    assert out.image.shape == (112, 112, 3)
    np.testing.assert_array_equal(out.image, align_face(crop, lm))
    bad = {
        "nan": np.where(np.arange(10).reshape(5, 2) == 3, np.nan, lm),
        "outside": lm + [[400.0, 0.0]],
        "coincident": np.repeat(lm[:1], 5, axis=0),
        "collinear": np.c_[np.linspace(10, 100, 5), np.full(5, 80.0)],
    }
    for points in bad.values():
        with pytest.raises(LandmarkError):
            decode(encode(crop), landmarks=points)
    names = ["good.png", *[f"{k}.png" for k in bad]]
    for name in names:
        (tmp_path / name).write_bytes(encode(crop))
    names.append("unlisted.png")
    (tmp_path / "unlisted.png").write_bytes(encode(crop))
    points = np.stack([lm, *bad.values()]).reshape(len(names) - 1, 10)
    frame = pd.DataFrame({"path": names[:-1]})
    for i in range(10):
        frame[f"lm{i // 2}_{'xy'[i % 2]}"] = points[:, i]
    n = len(names)
    batch = {
        "shard": np.zeros(n, np.int64),
        "pos": np.arange(n),
        "path": np.array(names, dtype=object),
        "identity": np.full(n, None, dtype=object),
    }
    table = LandmarkTable.from_frame(frame)
    res = read_and_decode(batch, root=str(tmp_path), resize=False, landmarks=table)
    assert res["error"][0] == ""
    np.testing.assert_array_equal(res["image"][0], align_face(crop, lm))
    assert "NaN" in res["error"][1] and "outside" in res["error"][2]
    assert "degenerate" in res["error"][3] and "degenerate" in res["error"][4]
    assert "NaN" in res["error"][5]  # an image the landmarks do not list


def test_landmark_inputs_ijb_file_and_manifest_columns(tmp_path: Path) -> None:
    (tmp_path / "ijbc_name_5pts_score.txt").write_text(
        "1.jpg 1 2 3 4 5 6 7 8 9 10 0.99\n2.jpg 11 12 13 14 15 16 17 18 19 20 0.5\n"
    )
    lm = read_landmark_file(str(tmp_path / "ijbc_name_5pts_score.txt"))
    assert list(lm["path"]) == ["1.jpg", "2.jpg"] and lm["lm4_y"].tolist() == [10.0, 20.0]
    # IJB names files; the embed job's paths may carry folders: matched by file name
    points = LandmarkTable.from_frame(lm).lookup(["loose_crop/2.jpg", "1.jpg", "3.jpg"])
    assert points[0, 0] == 11.0 and points[1, 0] == 1.0 and np.isnan(points[2]).all()
    (tmp_path / "bad_5pts_score.txt").write_text("1.jpg 1 2 3\n")
    with pytest.raises(EmbedError, match="11 or 12 fields"):
        read_landmark_file(str(tmp_path / "bad_5pts_score.txt"))
    cols = ",".join(f"lm{i}_{a}" for i in range(5) for a in "xy")
    (tmp_path / "m.csv").write_text(f"path,identity,{cols}\na.png,x,{','.join(['1'] * 10)}\n")
    table = manifest_landmarks(str(tmp_path / "m.csv"))
    assert table["lm2_x"].tolist() == [1.0] and list(table["path"]) == ["a.png"]
    (tmp_path / "half.csv").write_text("path,lm0_x\na.png,1\n")
    with pytest.raises(EmbedError, match="lacks lm0_y"):
        manifest_landmarks(str(tmp_path / "half.csv"))
    (tmp_path / "none.csv").write_text("path\na.png\n")
    assert manifest_landmarks(str(tmp_path / "none.csv")) is None


@pytest.mark.ray
def test_embed_job_aligns_by_landmarks_file_with_flip(ray_cluster: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_backbone("iresnet-demo").eval()
    ckpt = tmp_path / "demo.pth"
    save_checkpoint(model, str(ckpt), "iresnet-demo")
    images = tmp_path / "loose_crop"
    images.mkdir()
    lines, crops = [], {}
    for k, (seed, angle, scale, shift) in enumerate(CASES):
        crop, lm, _ = loose_crop(seed, angle, scale, shift)
        (images / f"{k + 1}.jpg").write_bytes(encode(crop, "PNG"))
        crops[f"{k + 1}.jpg"] = (crop, lm)
        lines.append(f"{k + 1}.jpg " + " ".join(f"{v:.4f}" for v in lm.ravel()) + " 0.9")
    (images / "4.jpg").write_bytes(encode(crops["1.jpg"][0], "PNG"))  # not in the file
    (tmp_path / "ijbc_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    cfg = EmbedConfig(
        images=str(images),
        model=str(ckpt),
        arch="iresnet-demo",
        output=str(tmp_path / "out"),
        landmarks=str(tmp_path / "ijbc_name_5pts_score.txt"),
        flip=True,
        max_failure_fraction=0.5,
        batch_size=4,
    )
    summary = run_embed(cfg)
    assert (summary.embedded, summary.failed) == (3, 1)
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["settings"]["flip"] is True and "ArcFace" in doc["settings"]["alignment"]
    emb = pq.read_table(tmp_path / "out" / "embeddings").to_pandas().set_index("path")
    fails = pq.read_table(tmp_path / "out" / "failures").to_pandas()
    assert list(fails["path"]) == ["4.jpg"] and "NaN" in fails["error"].iloc[0]
    for name, (crop, lm) in crops.items():
        written = np.array([float(f"{v:.4f}") for v in lm.ravel()])  # as in the file
        face = decode(encode(crop, "PNG"), landmarks=written).image
        x = torch.from_numpy(to_input(face[None]))
        with torch.inference_mode():
            ref = (model(x) + model(torch.flip(x, dims=[3]))) / 2
        got = np.asarray(emb.loc[name, "embedding"])
        np.testing.assert_allclose(got, ref.numpy()[0], rtol=1e-4, atol=1e-5)
    assert pd.notna(emb["quality"]).all()
