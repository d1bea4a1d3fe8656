"""Image degradations scaled by one level ``d`` in [0, 1]: the synthetic image quality.

Occlusion, Gaussian blur, downscale-upscale, sensor noise and JPEG compression are applied in
that order, each with strength ``d`` times a random factor in [0.5, 1], so that ``d`` orders the
images by how much identity information survives while the kind of damage still varies.
``d = 0`` returns the image unchanged.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MAX_BLUR_SIGMA = 3.0
MIN_SCALE = 0.16  # at d = 1 the face is resampled through ~18x18 pixels
MAX_NOISE_STD = 28.0
MIN_JPEG_QUALITY = 6
MAX_OCCLUSION_SIDE = 0.6  # fraction of the image side


@functools.cache
def _noise_bank() -> np.ndarray:
    """A fixed field of standard normal noise; images take random crops of it (fast, seeded)."""
    return np.random.default_rng(20211111).standard_normal((256, 256, 3), dtype=np.float32)


def degrade(image: np.ndarray, d: float, rng: np.random.Generator) -> np.ndarray:
    """Return a degraded copy of ``image`` (uint8 HxWx3) at level ``d``."""
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"degradation level must be in [0, 1], got {d}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    if d == 0.0:
        return image.copy()
    h, w = image.shape[:2]
    k = (rng.uniform(0.5, 1.0, 5) * d).tolist()
    pil = Image.fromarray(image)
    # occlusion: a flat or gradient patch over part of the face (more often the stronger d)
    if rng.uniform() < 0.25 + 0.75 * d:
        side = k[0] * MAX_OCCLUSION_SIDE
        ow, oh = side * w * rng.uniform(0.6, 1.4), side * h * rng.uniform(0.6, 1.4)
        cx, cy = rng.uniform(0.25 * w, 0.75 * w), rng.uniform(0.25 * h, 0.8 * h)
        colour = tuple(int(c) for c in rng.uniform(0, 255, 3))
        box = (cx - ow / 2, cy - oh / 2, cx + ow / 2, cy + oh / 2)
        draw = ImageDraw.Draw(pil)
        if rng.uniform() < 0.5:
            draw.rectangle(box, fill=colour)
        else:
            draw.ellipse(box, fill=colour)
    # blur and downscale-upscale; the blur runs at the reduced size (cheaper, same effect)
    scale = 1.0 - k[2] * (1.0 - MIN_SCALE)
    sigma = k[1] * MAX_BLUR_SIGMA
    if scale < 0.95:
        small = (max(2, round(w * scale)), max(2, round(h * scale)))
        pil = pil.resize(small, Image.Resampling.BILINEAR, reducing_gap=None)
        if sigma * scale > 0.2:
            pil = pil.filter(ImageFilter.GaussianBlur(radius=sigma * scale))
        pil = pil.resize((w, h), Image.Resampling.BILINEAR)
    elif sigma > 0.2:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=sigma))
    arr = np.asarray(pil, np.float32)
    noise_std = k[3] * MAX_NOISE_STD
    if noise_std > 0.5:
        bank = _noise_bank()
        oy, ox = rng.integers(0, bank.shape[0] - h + 1), rng.integers(0, bank.shape[1] - w + 1)
        arr += bank[oy : oy + h, ox : ox + w] * np.float32(noise_std * rng.choice((-1.0, 1.0)))
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    quality = int(round(95 - k[4] * (95 - MIN_JPEG_QUALITY)))
    if quality < 90:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out = Image.open(buf).convert("RGB")
    return np.asarray(out, np.uint8)
