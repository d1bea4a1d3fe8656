"""Comparison scores (spec section 2): cosine, pair quality and the QMagFace score.

Plain numpy on arrays; the same functions run in the driver, in Ray tasks and in the pyfunc.
"""

from __future__ import annotations

import numpy as np


def norms(embeddings: np.ndarray) -> np.ndarray:
    """L2 norm of each row: the MagFace quality of each face."""
    e = np.asarray(embeddings)
    return np.sqrt(np.einsum("ij,ij->i", e, e, dtype=np.float64))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two embedding arrays of the same shape (float64)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (n, d) arrays of one shape, got {a.shape} and {b.shape}")
    dots = np.einsum("ij,ij->i", a, b)
    return dots / (norms(a) * norms(b))


def pair_quality(quality_a: np.ndarray, quality_b: np.ndarray) -> np.ndarray:
    """Pair quality: the lower of the two faces' qualities."""
    return np.minimum(np.asarray(quality_a, np.float64), np.asarray(quality_b, np.float64))


def omega(cos: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """The quality weight ``min(0, beta * s - alpha)``."""
    return np.minimum(0.0, beta * np.asarray(cos, np.float64) - alpha)


def qmagface_score(
    cos: np.ndarray,
    quality: np.ndarray,
    alpha: float,
    beta: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``s_hat = omega(s) * q + s``: lower scores are adjusted by the pair's lower quality.

    ``out``: a float64 buffer of the same length to write into (the same roundings)."""
    cos = np.asarray(cos, np.float64)
    x = np.multiply(cos, beta, out=out)
    x -= alpha
    np.minimum(0.0, x, out=x)
    x *= np.asarray(quality, np.float64)
    x += cos
    return x
