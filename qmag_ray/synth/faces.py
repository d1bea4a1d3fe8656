"""Face-like 112x112 images whose identity lives in geometry and fine texture.

An :class:`Identity` holds the shape of a face (outline, eyes, brows, nose, mouth, hairline),
a fixed set of small marks (moles) and a fine skin texture pattern: cues that blur, downscaling,
noise, compression and occlusion really destroy. Colours (skin, hair, background) and the
nuisances (pose, expression, illumination) are drawn per image from one shared distribution,
so colour carries no identity. Everything is plain numpy and Pillow and deterministic in the
random generators passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SIZE = 112
_TEXTURE_CELLS = (4, 7)  # pixel sizes of the two texture scales
_RAMP = np.linspace(0, 1, SIZE, dtype=np.float32)
_TEX_MEAN = 190  # texture value of the mean skin, as a uint8 grey level


@dataclass(frozen=True)
class Identity:
    """Identity-specific geometry (in face coordinates, pixels of a 112x112 image) and texture."""

    face_w: float
    face_h: float
    chin: float
    cheek: float
    eye_y: float
    eye_dx: float
    eye_rx: float
    eye_ry: float
    eye_tilt: float
    iris_r: float
    brow_dy: float
    brow_len: float
    brow_tilt: float
    brow_w: int
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_h: float
    hair_h: float
    hair_part: float
    marks: np.ndarray  # (k, 3): x, y, radius
    texture: np.ndarray  # (112, 112) uint8 skin texture, mean _TEX_MEAN


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one identity's geometry and texture."""
    u = rng.uniform
    n_marks = int(rng.integers(3, 7))
    marks = np.stack(
        [u(-22, 22, n_marks), u(-25, 35, n_marks), u(1.2, 2.4, n_marks)], axis=1
    ).astype(np.float32)
    return Identity(
        face_w=u(29, 40),
        face_h=u(40, 50),
        chin=u(0.0, 0.45),
        cheek=u(-0.12, 0.12),
        eye_y=u(-16, -6),
        eye_dx=u(13, 21),
        eye_rx=u(5.0, 8.5),
        eye_ry=u(2.3, 4.6),
        eye_tilt=u(-0.25, 0.25),
        iris_r=u(1.8, 3.4),
        brow_dy=u(6, 11),
        brow_len=u(9, 16),
        brow_tilt=u(-0.35, 0.35),
        brow_w=int(rng.integers(2, 5)),
        nose_len=u(11, 22),
        nose_w=u(4, 11),
        mouth_y=u(18, 30),
        mouth_w=u(10, 22),
        lip_h=u(1.5, 4.5),
        hair_h=u(6, 20),
        hair_part=u(-0.6, 0.6),
        marks=marks,
        texture=_texture(rng),
    )


def _texture(rng: np.random.Generator) -> np.ndarray:
    """Fine multiplicative texture: random cells at two small scales, about +-25% of the mean."""
    tex = np.ones((SIZE, SIZE), np.float32)
    for cell, amp in zip(_TEXTURE_CELLS, (0.16, 0.10), strict=True):
        n = -(-SIZE // cell)
        grid = rng.uniform(-amp, amp, (n, n)).astype(np.float32)
        tex += np.repeat(np.repeat(grid, cell, 0), cell, 1)[:SIZE, :SIZE]
    return np.clip(tex * _TEX_MEAN, 0, 255).astype(np.uint8)


_CIRCLES = {
    n: (np.cos(t), np.sin(t))
    for n in (8, 12, 20, 32)
    for t in [np.linspace(0, 2 * np.pi, n, endpoint=False)]
}


def _ellipse(cx: float, cy: float, rx: float, ry: float, tilt: float = 0.0, n: int = 20):
    cos_t, sin_t = _CIRCLES[n]
    x, y = rx * cos_t, ry * sin_t
    c, s = np.cos(tilt), np.sin(tilt)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _pose_matrix(rng: np.random.Generator, info: dict | None = None) -> np.ndarray:
    """2x3 affine from face coordinates (origin at the face centre) to image pixels."""
    angle = rng.uniform(-0.12, 0.12)
    if info is not None:
        info["roll"] = float(angle)
    scale = rng.uniform(0.94, 1.06)
    tx, ty = rng.uniform(-3.5, 3.5, 2)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, SIZE / 2 + tx], [s, c, SIZE / 2 + 4 + ty]])


def _apply(m: np.ndarray, pts: np.ndarray) -> list[tuple[float, float]]:
    out = pts @ m[:, :2].T + m[:, 2]
    return [tuple(p) for p in out.tolist()]


def _face_outline(ident: Identity) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    x = ident.face_w * np.cos(t)
    y = ident.face_h * np.sin(t)
    lower = np.sin(t) > 0
    # narrow the jaw towards a chin (lower half), widen or narrow the cheeks
    x = np.where(lower, x * (1 - ident.chin * np.sin(t) ** 2), x * (1 + ident.cheek * np.cos(t)))
    return np.stack([x, y], axis=1)


def render_face(ident: Identity, rng: np.random.Generator, info: dict | None = None) -> np.ndarray:
    """One clean image (uint8 RGB, 112x112) of ``ident`` with random pose, expression, lighting.

    ``info`` (optional) receives the drawn in-plane rotation ``roll`` (radians); the image and
    the random stream are the same with or without it."""
    m = _pose_matrix(rng, info)
    # background: a smooth gradient between four random corner colours
    c = rng.uniform(40, 220, (2, 2, 3)).astype(np.float32)
    top = c[0, 0] + (c[0, 1] - c[0, 0]) * _RAMP[:, None]
    bottom = c[1, 0] + (c[1, 1] - c[1, 0]) * _RAMP[:, None]
    bg = Image.fromarray((top[None] + (bottom - top)[None] * _RAMP[:, None, None]).astype(np.uint8))
    # skin: one flat colour (shared distribution, no identity) times the identity's texture,
    # which moves with the face
    skin = rng.uniform(110, 200) * np.array([1.0, rng.uniform(0.72, 0.86), rng.uniform(0.55, 0.75)])
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    shift = np.array([[1, 0, SIZE / 2], [0, 1, SIZE / 2], [0, 0, 1]])
    tm = (shift @ inv)[:2].ravel().tolist()
    tex = Image.fromarray(ident.texture).transform(
        (SIZE, SIZE), Image.Transform.AFFINE, tm, Image.Resampling.BILINEAR, fillcolor=_TEX_MEAN
    )
    fill = tuple(int(v) for v in np.clip(skin * 255 / _TEX_MEAN, 0, 255))
    face = ImageChops.multiply(Image.new("RGB", (SIZE, SIZE), fill), tex.convert("RGB"))
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).polygon(_apply(m, _face_outline(ident)), fill=255)
    canvas = Image.composite(face, bg, mask)
    _draw_features(ImageDraw.Draw(canvas), ident, m, rng, skin)
    # illumination: a random linear gradient times a gain, as a multiplicative light map
    gain = rng.uniform(0.65, 1.0)
    gx, gy = rng.uniform(-0.3, 0.3, 2)
    xy = 2 * _RAMP - 1
    light = gain * (1 - 0.3 * (abs(gx) + abs(gy)) + gx * xy[None, :] + gy * xy[:, None])
    out = np.asarray(canvas, np.float32) * light[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _draw_features(
    draw: ImageDraw.ImageDraw,
    ident: Identity,
    m: np.ndarray,
    rng: np.random.Generator,
    skin: np.ndarray,
) -> None:
    u = rng.uniform
    hair = tuple(int(v) for v in u(10, 90) * np.array([1.0, u(0.7, 1.0), u(0.5, 0.9)]))
    dark = tuple(int(v) for v in skin * u(0.35, 0.5))
    # hairline: a cap over the top of the face whose depth and parting are identity cues
    t = np.linspace(np.pi, 2 * np.pi, 17)
    cap_top = np.stack([ident.face_w * 1.04 * np.cos(t), ident.face_h * 1.04 * np.sin(t)], 1)
    xs = np.linspace(ident.face_w, -ident.face_w, 17)
    line_y = -ident.face_h + ident.hair_h + 6 * np.abs(xs / ident.face_w - ident.hair_part)
    cap = np.concatenate([cap_top, np.stack([xs, line_y], 1)])
    draw.polygon(_apply(m, cap), fill=hair)
    # expression
    openness = u(0.55, 1.1)
    brow_raise = u(-2, 2)
    smile = u(-3, 4)
    mouth_open = u(0, 5) if u() < 0.5 else 0.0
    for side in (-1, 1):
        ex = side * ident.eye_dx
        tilt = side * ident.eye_tilt
        draw.polygon(
            _apply(m, _ellipse(ex, ident.eye_y, ident.eye_rx, ident.eye_ry * openness, tilt)),
            fill=(235, 235, 230),
        )
        ir = min(ident.iris_r, ident.eye_ry * openness + 0.5)
        draw.polygon(_apply(m, _ellipse(ex, ident.eye_y, ir, ir, 0, 12)), fill=(30, 25, 20))
        by = ident.eye_y - ident.brow_dy - brow_raise
        bt = side * ident.brow_tilt
        half = ident.brow_len / 2
        brow = np.array(
            [
                [ex - half * np.cos(bt), by + half * np.sin(bt)],
                [ex + half * np.cos(bt), by - half * np.sin(bt)],
            ]
        )
        draw.line(_apply(m, brow), fill=hair, width=ident.brow_w)
    # nose: two side lines and a base
    nl, nw = ident.nose_len, ident.nose_w
    ny0 = ident.eye_y + 2
    nose = np.array([[-nw * 0.2, ny0], [-nw / 2, ny0 + nl], [nw / 2, ny0 + nl], [nw * 0.2, ny0]])
    draw.line(_apply(m, nose), fill=dark, width=2)
    # mouth: upper and lower lip curves bent by the smile
    x = np.linspace(-ident.mouth_w / 2, ident.mouth_w / 2, 9)
    bend = -smile * (1 - (2 * x / ident.mouth_w) ** 2)
    upper = np.stack([x, ident.mouth_y + bend - ident.lip_h / 2], 1)
    lower = np.stack([x[::-1], (ident.mouth_y + bend + ident.lip_h / 2 + mouth_open)[::-1]], 1)
    lip = tuple(int(v) for v in skin * np.array([0.75, 0.45, 0.45]))
    draw.polygon(_apply(m, np.concatenate([upper, lower])), fill=lip)
    if mouth_open > 1:
        draw.line(
            _apply(m, np.stack([x, ident.mouth_y + bend + mouth_open / 2], 1)),
            fill=(40, 20, 20),
            width=max(1, int(mouth_open / 2)),
        )
    for mx, my, r in ident.marks.tolist():
        draw.polygon(_apply(m, _ellipse(mx, my, r, r, 0, 8)), fill=dark)
