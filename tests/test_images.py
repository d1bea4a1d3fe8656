"""Decoding and preprocessing: BGR order, [0, 1] scale, NCHW layout, explicit conversions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from qmag_ray.images import ImageError, decode, decode_face, to_input


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_pure_red_png_becomes_channel_2_of_bgr_input() -> None:
    data = encode(Image.new("RGB", (112, 112), (255, 0, 0)))
    face = decode_face(data)
    assert face.shape == (112, 112, 3) and face.dtype == np.uint8
    assert (face[:, :, 2] == 255).all() and (face[:, :, :2] == 0).all()
    x = to_input(face[None])
    assert x.shape == (1, 3, 112, 112) and x.dtype == np.float32
    assert (x[0, 2] == 1.0).all()
    assert (x[0, 0] == 0.0).all() and (x[0, 1] == 0.0).all()


def test_known_values_scale_by_255_without_mean_or_std() -> None:
    # R=51, G=102, B=204 -> BGR channels 0.8, 0.4, 0.2 exactly as value / 255.
    data = encode(Image.new("RGB", (112, 112), (51, 102, 204)))
    x = to_input(decode_face(data)[None])
    np.testing.assert_array_equal(x[0, :, 5, 7], np.float32([204, 102, 51]) / np.float32(255))
    np.testing.assert_allclose(x[0, :, 5, 7], [0.8, 0.4, 0.2], rtol=1e-6)
    assert x[0, 2, 0, 0] == pytest.approx(0.2)


def test_layout_keeps_each_pixel_in_place() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    face = decode_face(encode(Image.fromarray(rgb, "RGB")))
    np.testing.assert_array_equal(face, rgb[:, :, ::-1])
    x = to_input(np.stack([face, face[::-1]]))
    assert x.shape == (2, 3, 112, 112)
    # pixel (row 3, column 9), channel c of the BGR face sits at x[n, c, 3, 9]
    np.testing.assert_array_equal(x[0, :, 3, 9], face[3, 9].astype(np.float32) / 255)
    np.testing.assert_array_equal(x[1, :, 3, 9], face[108, 9].astype(np.float32) / 255)


def test_grayscale_is_replicated_to_three_channels() -> None:
    data = encode(Image.new("L", (112, 112), 77))
    d = decode(data)
    assert d.mode == "L"
    assert (d.image == 77).all() and d.image.shape == (112, 112, 3)


def test_rgba_drops_alpha_and_keeps_colour_in_bgr() -> None:
    data = encode(Image.new("RGBA", (112, 112), (10, 20, 30, 0)))
    d = decode(data)
    assert d.mode == "RGBA"
    assert d.image[0, 0].tolist() == [30, 20, 10]


def test_palette_and_cmyk_are_converted() -> None:
    pal = Image.new("RGB", (112, 112), (0, 0, 255)).convert("P")
    assert decode_face(encode(pal))[0, 0].tolist() == [255, 0, 0]
    cmyk = Image.new("CMYK", (112, 112), (0, 0, 0, 0))  # white
    assert (decode_face(encode(cmyk, "JPEG")) > 250).all()


def test_wrong_size_is_an_error_unless_resize() -> None:
    data = encode(Image.new("RGB", (250, 250), (0, 255, 0)))
    with pytest.raises(ImageError, match=r"image is 250x250, expected 112x112.*--resize"):
        decode_face(data)
    d = decode(data, resize=True)
    assert d.resized_from == (250, 250)
    assert d.image.shape == (112, 112, 3)
    assert d.image[50, 50].tolist() == [0, 255, 0]
    assert decode(encode(Image.new("RGB", (112, 112)))).resized_from is None


def test_real_face_decodes(shared_data) -> None:
    data = (shared_data / "magface_toy" / "0.jpg").read_bytes()
    face = decode_face(data)
    assert face.shape == (112, 112, 3)
    # Pillow's RGB array reversed is the BGR face
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(face, rgb[:, :, ::-1])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is a text file, not a jpeg\n", "not an image in a supported format"),
    ],
)
def test_bad_bytes_give_actionable_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        decode_face(data)


def test_truncated_jpeg_is_an_error_not_grey_padding(shared_data) -> None:
    data = (shared_data / "magface_toy" / "3.jpg").read_bytes()
    with pytest.raises(ImageError, match="JPEG data is truncated or corrupt"):
        decode_face(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt image header"):
        decode_face(data[:100])


def test_sixteen_bit_png_is_refused_with_advice() -> None:
    img = Image.fromarray(np.full((112, 112), 40000, dtype=np.uint16))
    with pytest.raises(ImageError, match="16 bits per sample.*8-bit"):
        decode_face(encode(img))


def test_to_input_rejects_wrong_dtype_or_shape() -> None:
    with pytest.raises(ValueError, match="uint8 batch"):
        to_input(np.zeros((1, 112, 112, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 batch"):
        to_input(np.zeros((112, 112, 3), dtype=np.uint8))
