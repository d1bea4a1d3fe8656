"""Hostile and suspicious inputs of the embedding job (issue 12, item 4, embed side).

- a symbolic link inside the images tree that leaves the root (to a file or to a folder) is a
  failure row and is never read: its target is a valid face, which would be embedded if it
  were read, and a secret string next to it appears in no output file and no message;
- manifest paths are normalised before the duplicate check: ``a/f.jpg``, ``a//f.jpg`` and
  ``a/./f.jpg`` are one file, and such a manifest is refused before anything is written;
- a PNG with a bad CRC, a 16-bit PNG, an animated GIF and an animated PNG are failures with a
  reason, not silently embedded (Pillow itself decodes the first three without a word, which
  the test checks first).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qmag_ray.embedding import EmbedConfig, EmbedError, run_embed
from qmag_ray.embedding.inputs import read_manifest
from qmag_ray.model import create_backbone, save_checkpoint

SECRET = "s3cr3t-token-4711"


def png_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png16() -> bytes:
    """A 112x112 RGB PNG with 16 bits per sample, written by hand (Pillow cannot write it)."""
    rows = np.full((112, 112, 3), 40000, dtype=">u2")
    raw = b"".join(b"\x00" + rows[r].tobytes() for r in range(112))
    ihdr = struct.pack(">IIBBBBB", 112, 112, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def bad_crc_png() -> bytes:
    data = bytearray(png_bytes(Image.new("RGB", (112, 112), (10, 20, 30))))
    at = data.find(b"IDAT")
    length = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 4 + length] ^= 0xFF  # first byte of the IDAT CRC
    return bytes(data)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (112, 112), (60 * i, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


SUSPICIOUS = {
    "p1/bad_crc.png": (bad_crc_png, "bad CRC"),
    "p1/deep.png": (png16, "16 bits per sample"),
    "p1/anim.gif": (lambda: animated("GIF"), "has 3 frames"),
    "p1/anim.png": (lambda: animated("PNG"), "animated (APNG)"),
}


def test_pillow_alone_would_decode_the_suspicious_files_silently() -> None:
    """The premise of the decode checks: without them these files become embeddings."""
    for name in ("p1/bad_crc.png", "p1/deep.png", "p1/anim.gif"):
        img = Image.open(io.BytesIO(SUSPICIOUS[name][0]()))
        img.load()
        assert img.size == (112, 112), name


def test_training_manifest_reader_normalises_paths_before_the_duplicate_check(
    tmp_path: Path,
) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path\na/f.jpg\nb/g.jpg\n")
    assert read_manifest(str(csv))["path"].tolist() == ["a/f.jpg", "b/g.jpg"]
    for twin in ("a//f.jpg", "a/./f.jpg", "./a/f.jpg", "a\\f.jpg"):
        csv.write_text(f"path\na/f.jpg\n{twin}\n")
        with pytest.raises(EmbedError, match="repeated paths"):
            read_manifest(str(csv))


@pytest.mark.ray
def test_links_out_of_the_root_and_suspicious_decodes_are_failures_never_reads(
    ray_cluster: None, tmp_path: Path, shared_data: Path
) -> None:
    root = tmp_path / "images"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    face = (shared_data / "magface_toy" / "3.jpg").read_bytes()
    (outside / "face.jpg").write_bytes(face)  # a valid face: embedded if it were ever read
    (outside / "notes.jpg").write_bytes(f"password={SECRET}\n".encode())
    (outside / "folder").mkdir()
    (outside / "folder" / "x.jpg").write_bytes(face)
    good = []
    for i in range(6):
        rel = f"p{i % 2}/{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "magface_toy" / f"{i}.jpg", root / rel)
        good.append(rel)
    os.symlink(root / "p0" / "0.jpg", root / "p1" / "inside-link.jpg")  # stays in the root
    good.append("p1/inside-link.jpg")
    links = {"p0/out-face.jpg": outside / "face.jpg", "p0/out-secret.jpg": outside / "notes.jpg"}
    links["p1/out-folder"] = outside / "folder"
    for rel, target in links.items():
        os.symlink(target, root / rel)
    for rel, (make, _) in SUSPICIOUS.items():
        (root / rel).write_bytes(make())
    torch.manual_seed(0)
    save_checkpoint(create_backbone("iresnet-demo").eval(), str(tmp_path / "m.pth"), "iresnet-demo")
    out = tmp_path / "out"
    cfg = EmbedConfig(
        images=str(root),
        model=str(tmp_path / "m.pth"),
        arch="iresnet-demo",
        output=str(out),
        batch_size=4,
        read_block_rows=4,
        max_failure_fraction=0.5,
    )
    summary = run_embed(cfg)
    assert (summary.inputs, summary.embedded, summary.failed) == (14, 7, 7)

    def rows(folder: str) -> list[dict]:
        return [
            r
            for p in sorted((out / folder).rglob("*.parquet"))
            for r in pq.read_table(p).to_pylist()
        ]

    embedded = rows("embeddings")
    assert sorted(r["path"] for r in embedded) == sorted(good)
    failures = {r["path"]: r["error"] for r in rows("failures")}
    assert sorted(failures) == sorted([*links, *SUSPICIOUS])
    for rel in links:
        assert "symbolic link pointing outside the images root: not read" in failures[rel]
    for rel, (_, reason) in SUSPICIOUS.items():
        assert reason in failures[rel], (rel, failures[rel])
    # nothing of the link targets leaked: not in any file of the output, not in the summary
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in json.dumps(summary.to_dict())


@pytest.mark.ray
def test_manifest_paths_spelt_three_ways_are_one_file_and_refused(
    ray_cluster: None, tmp_path: Path, shared_data: Path
) -> None:
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    shutil.copy(shared_data / "magface_toy" / "1.jpg", root / "a" / "f.jpg")
    shutil.copy(shared_data / "magface_toy" / "2.jpg", root / "a" / "g.jpg")
    torch.manual_seed(0)
    save_checkpoint(create_backbone("iresnet-demo").eval(), str(tmp_path / "m.pth"), "iresnet-demo")
    manifest = tmp_path / "manifest.parquet"
    paths = ["a/f.jpg", "a/g.jpg", "a//f.jpg", "a/./f.jpg"]
    pq.write_table(pa.table({"path": paths, "identity": ["x"] * 4}), manifest, row_group_size=2)
    out = tmp_path / "out"
    cfg = EmbedConfig(
        manifest=str(manifest),
        images_root=str(root),
        model=str(tmp_path / "m.pth"),
        arch="iresnet-demo",
        output=str(out),
    )
    with pytest.raises(
        EmbedError, match=r"3 rows with repeated paths after normalisation.*a/f\.jpg"
    ):
        run_embed(cfg)
    assert not list(out.rglob("*.parquet"))
    assert not (out / "summary.json").exists()
