"""Five-point face alignment onto the ArcFace 112x112 template (the one MagFace was trained on).

A face with five landmarks (left eye, right eye, nose tip, left and right mouth corner, in
image pixels, "left" as seen in the image) is warped by the least-squares similarity transform
(rotation, uniform scale, translation; no reflection, no shear) that maps the landmarks onto
the template's, with OpenCV's ``warpAffine``: bilinear interpolation, black border. This is the
alignment IJB-B/C evaluations and MagFace's training data use; a plain resize gives different
(worse) embeddings.

Landmarks are checked first: NaN/inf, points outside the image, or a degenerate configuration
(coincident or collinear points, which leave the transform undetermined) raise
``LandmarkError``, which the embedding job records as a per-image failure.
"""

from __future__ import annotations

import numpy as np

from qmag_ray.images import INPUT_SIZE, ImageError

ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)
"""Landmark positions of the ArcFace/InsightFace 112x112 aligned face (x, y in pixels)."""

LANDMARK_COLUMNS = tuple(f"lm{i}_{axis}" for i in range(5) for axis in ("x", "y"))
"""Manifest columns holding the five landmarks, in template order."""

ALIGNMENT = "ArcFace 5-point similarity, cv2.warpAffine bilinear, black border, 112x112"
"""Short description of the alignment, recorded with every run that aligns."""

MIN_SPREAD = 1.0
"""Smallest spread (pixels, second singular value of the centred points) of usable landmarks."""


class LandmarkError(ImageError):
    """Landmarks that cannot align a face; the message says what is wrong with them."""


def check_landmarks(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """The landmarks as a (5, 2) float64 array, or ``LandmarkError`` saying why not."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.size != 10:
        raise LandmarkError(f"expected 5 landmarks (10 numbers), got {pts.size}")
    pts = pts.reshape(5, 2)
    if not np.isfinite(pts).all():
        raise LandmarkError("landmarks contain NaN or infinite values (missing detection?)")
    outside = (pts[:, 0] < 0) | (pts[:, 0] > width) | (pts[:, 1] < 0) | (pts[:, 1] > height)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise LandmarkError(
            f"landmark {k} ({pts[k, 0]:.1f}, {pts[k, 1]:.1f}) lies outside the {width}x{height} "
            "image: landmarks are in the image's pixel coordinates"
        )
    spread = np.linalg.svd(pts - pts.mean(axis=0), compute_uv=False)
    if spread[-1] < MIN_SPREAD:
        raise LandmarkError(
            f"degenerate landmarks (coincident or collinear: spread {spread[-1]:.3g} px); "
            "they do not determine an alignment"
        )
    return pts


def similarity_transform(src: np.ndarray, dst: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """The 2x3 matrix of the least-squares similarity mapping ``src`` points onto ``dst``.

    Parametrised as ``x' = a x - b y + tx``, ``y' = b x + a y + ty`` (a scaled rotation), so
    the linear least-squares solution is the best similarity without reflection.
    """
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    n = len(src)
    design = np.zeros((2 * n, 4))
    design[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)]
    design[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(n), np.ones(n)]
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, dst.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def align_face(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Warp a uint8 (H, W, 3) image to the 112x112 aligned face given its five landmarks.

    Raises:
        LandmarkError: unusable landmarks (see the module docstring).
    """
    import cv2

    h, w = image.shape[:2]
    pts = check_landmarks(landmarks, w, h)
    matrix = similarity_transform(pts)
    return cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix,
        (INPUT_SIZE, INPUT_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
