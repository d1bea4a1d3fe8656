"""Decoding aligned face images and turning them into network input, exactly as MagFace expects.

MagFace networks were trained on faces aligned to 112x112 (ArcFace 5-point template), decoded
by OpenCV, so the channel order is **BGR**, and scaled to **[0, 1]** by dividing by 255, with
no mean or standard-deviation normalisation, in **NCHW float32** layout. RGB order or
``(x - 127.5) / 128`` scaling give plausible-looking but wrong embeddings, so this module is
the one place where that convention lives.

Decoding uses Pillow with an allow-list of plain raster formats (no plug-in that runs external
programs), fully decodes every file (truncated data is an error, never silently padded) and
converts grayscale, palette, alpha and CMYK images to colour explicitly.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

INPUT_SIZE = 112
"""Side of the aligned face the networks take (pixels)."""

PREPROCESSING = f"BGR, [0,1], NCHW, {INPUT_SIZE}x{INPUT_SIZE}"
"""Short description of the input convention, recorded with every embedding run."""

FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")
"""Pillow formats accepted; anything else is reported as not an image."""

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
)
"""File name endings treated as images when a directory tree is listed."""

MAX_PIXELS = 4096 * 4096
"""Largest image (width x height) accepted for resizing; bigger ones are refused unread."""

# Modes Pillow can convert to 8-bit RGB without losing meaning. Alpha is dropped (the colour
# under it is kept), palette images are expanded, grayscale is replicated to three channels.
_CONVERTIBLE = {"1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB"}


class ImageError(ValueError):
    """An image that cannot be used; the message says why and what to do about it."""


@dataclass(frozen=True)
class DecodedFace:
    """A decoded face and what had to be done to it.

    Attributes:
        image: uint8 array of shape (112, 112, 3), channels in BGR order.
        mode: Pillow mode of the file before conversion (``RGB``, ``L``, ``RGBA``...).
        resized_from: ``(width, height)`` of the file when it was resized, else ``None``.
    """

    image: np.ndarray
    mode: str
    resized_from: tuple[int, int] | None = None


def decode(data: bytes, *, resize: bool = False) -> DecodedFace:
    """Decode an encoded image into a 112x112 BGR face, reporting conversions and resizing.

    Raises:
        ImageError: empty, truncated, corrupt or unsupported data, an unsupported pixel
            format, or a size other than 112x112 when ``resize`` is false.
    """
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    if data.startswith(PNG_SIGNATURE):
        check_png(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:  # the file's bytes are never quoted (they may be secret)
        raise ImageError(
            f"not an image in a supported format ({', '.join(FORMATS)}); {len(data)} bytes"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large to decode safely: {exc}") from None
    except Exception as exc:  # a header Pillow recognises but cannot parse
        raise ImageError(
            f"truncated or corrupt image header ({type(exc).__name__}: {exc})"
        ) from None
    with img:
        frames = int(getattr(img, "n_frames", 1) or 1)
        if frames > 1:
            raise ImageError(
                f"{img.format} file has {frames} frames (animated or multi-page); an aligned "
                "face is one frame: export the frame to embed as its own file"
            )
        width, height = img.size
        if (width, height) != (INPUT_SIZE, INPUT_SIZE):
            if not resize:
                raise ImageError(
                    f"image is {width}x{height}, expected {INPUT_SIZE}x{INPUT_SIZE} aligned face; "
                    "pass --resize to resize"
                )
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"image is {width}x{height}, too large to resize to an aligned face "
                    f"(limit {MAX_PIXELS} pixels)"
                )
        try:
            img.load()
        except Exception as exc:  # Pillow raises OSError, SyntaxError, EOFError... on bad data
            raise ImageError(
                f"{img.format} data is truncated or corrupt ({type(exc).__name__}: {exc}); "
                "re-export the file"
            ) from None
        mode = img.mode
        rgb = _to_rgb(img)
        resized_from = None
        if rgb.size != (INPUT_SIZE, INPUT_SIZE):
            resized_from = rgb.size
            rgb = rgb.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
        array = np.asarray(rgb, dtype=np.uint8)
    # RGB -> BGR: reverse the channel axis, then make the array own contiguous memory.
    bgr = np.ascontiguousarray(array[:, :, ::-1])
    return DecodedFace(image=bgr, mode=mode, resized_from=resized_from)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(data: bytes) -> None:
    """Refuse PNG data Pillow would decode silently although it is damaged or lossy to convert.

    Every chunk's CRC is checked (Pillow skips the CRC of image data), 16-bit samples are
    refused rather than silently cut to 8 bits, and animated PNGs (``acTL``) are refused
    rather than reduced to their first frame.

    Raises:
        ImageError: naming the chunk or the property and what to do.
    """
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        end = at + 8 + length + 4
        if end > len(data):
            return  # truncated: Pillow's full decode reports it
        body = data[at + 4 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : end])
        name = kind.decode("latin-1")
        if zlib.crc32(body) & 0xFFFFFFFF != crc:
            raise ImageError(
                f"PNG chunk {name!r} has a bad CRC (the file is corrupt); re-export the file"
            )
        if kind == b"IHDR" and length >= 9 and data[at + 16] == 16:
            raise ImageError(
                "PNG has 16 bits per sample; convert it to 8-bit RGB or grayscale (it is not "
                "down-converted silently)"
            )
        if kind == b"acTL":
            raise ImageError(
                "PNG is animated (APNG); an aligned face is one frame: export the frame to "
                "embed as its own file"
            )
        if kind == b"IEND":
            return
        at = end


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image to 8-bit RGB, refusing formats that would lose meaning."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").convert("RGB")
    if mode in _CONVERTIBLE:
        return img.convert("RGB")
    raise ImageError(
        f"unsupported pixel format {mode!r} (e.g. 16-bit or floating point); "
        "convert the image to 8-bit RGB or grayscale"
    )


def decode_face(data: bytes, *, resize: bool = False) -> np.ndarray:
    """Decode an encoded aligned face into a uint8 (112, 112, 3) array in **BGR** order.

    Grayscale, palette, RGBA/LA (alpha dropped) and CMYK images are converted to colour. An
    image of another size is an error unless ``resize`` is true; then it is resized
    bilinearly to 112x112 and the caller should log that it happened (see :func:`decode`).

    Raises:
        ImageError: with a reason a person can act on.
    """
    return decode(data, resize=resize).image


def to_input(batch: np.ndarray) -> np.ndarray:
    """Turn uint8 NHWC BGR faces into the network's input: float32 NCHW in [0, 1].

    The channel order is kept (BGR) and values are divided by 255; no mean or standard
    deviation is subtracted, as MagFace was trained.
    """
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError(
            f"expected a uint8 batch of shape (N, H, W, 3), got {batch.dtype} {batch.shape}"
        )
    out = np.empty((batch.shape[0], 3, batch.shape[1], batch.shape[2]), dtype=np.float32)
    np.divide(batch.transpose(0, 3, 1, 2), np.float32(255.0), out=out)
    return out
