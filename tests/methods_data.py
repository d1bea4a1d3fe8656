"""Synthetic MagFace-like embeddings where the published fit is worse than plain cosine.

Every image has a latent quality ``u`` uniform in [0, 1] that drives both its embedding norm,
``norm_lo + (norm_hi - norm_lo) * u``, and its angular noise: the identity's unit centre plus
isotropic Gaussian noise of total size ``noise_lo + (noise_hi - noise_lo) * (1 - u)``. With a
wide norm range (5 to 60, where MagFace's is about 10 to 35) the optimal weight of the
per-weight search changes quickly with the threshold; the published line, fitted against
sigmoid-space thresholds and applied to raw cosines, then over-penalises low-quality pairs
and is worse than cosine on held-out identities (found by scanning settings; see
tests/benchmarks/which_fit.py). Used by tests/test_methods.py and that benchmark.
"""

from __future__ import annotations

import numpy as np

from qmag_ray.embeddings import EmbeddingTable

#: The geometry of the issue's situation (published fit worse than cosine), 128-d.
WIDE_NORMS = {"norm_lo": 5.0, "norm_hi": 60.0, "noise_lo": 0.4, "noise_hi": 1.6}


def quality_faces(
    n_identities: int,
    per_identity: int,
    dim: int,
    seed: int = 0,
    *,
    norm_lo: float = 5.0,
    norm_hi: float = 60.0,
    noise_lo: float = 0.4,
    noise_hi: float = 1.6,
) -> EmbeddingTable:
    """``n_identities x per_identity`` embeddings (see the module docstring), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_identities, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ident = np.repeat(np.arange(n_identities), per_identity)
    u = rng.uniform(0.0, 1.0, len(ident))
    spread = noise_lo + (noise_hi - noise_lo) * (1.0 - u)
    v = centres[ident] + rng.normal(size=(len(ident), dim)) / np.sqrt(dim) * spread[:, None]
    v *= ((norm_lo + (norm_hi - norm_lo) * u) / np.linalg.norm(v, axis=1))[:, None]
    image = np.tile(np.arange(per_identity), n_identities)
    paths = [f"faces/id{i:05d}/img{k}.jpg" for i, k in zip(ident, image, strict=True)]
    vectors = v.astype(np.float32)
    return EmbeddingTable(
        np.asarray(paths, dtype=object),
        np.asarray([f"id{i:05d}" for i in ident], dtype=object),
        vectors,
        np.linalg.norm(vectors.astype(np.float64), axis=1),
    )
