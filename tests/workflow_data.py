"""Synthetic MagFace-like embeddings for the workflow and CLI tests.

Each image has a latent quality ``u`` in [0, 1]: its embedding norm is ``10 + 25 u`` (as
MagFace), its angular noise grows as ``u`` falls, and low-quality images drift towards one
shared "average face" direction by ``common * (1 - u)`` (so low-quality impostors look alike,
the situation QMagFace is made for). A negative ``common`` (low-quality images drift away
from it) gives data where the published fit is worse than cosine on held-out identities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qmag_ray.embeddings import EmbeddingTable, write_embeddings

#: Settings that make QMagFace help (passing guard) and hurt (failing guard), seed 0.
HELPFUL = {"common": 0.5, "noise_lo": 0.3, "noise_hi": 1.2}
HARMFUL = {"common": -0.5, "noise_lo": 0.4, "noise_hi": 2.0}


def lfw_name(identity: int, image: int) -> tuple[str, str]:
    """(LFW person name, LFW file path) of image ``image`` (0-based) of ``identity``."""
    name = f"Person_{identity:04d}"
    return name, f"{name}/{name}_{image + 1:04d}.jpg"


def synthetic_table(
    n_identities: int = 300,
    per_identity: int = 6,
    dim: int = 64,
    seed: int = 0,
    *,
    common: float = 0.5,
    noise_lo: float = 0.3,
    noise_hi: float = 1.2,
    lfw_paths: bool = False,
    root: str = "faces",
) -> EmbeddingTable:
    """Embeddings of ``n_identities`` x ``per_identity`` images (see the module docstring)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_identities, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    average = rng.normal(size=dim)
    average /= np.linalg.norm(average)
    ident = np.repeat(np.arange(n_identities), per_identity)
    u = rng.uniform(0.0, 1.0, len(ident))
    spread = noise_lo + (noise_hi - noise_lo) * (1.0 - u)
    noise = rng.normal(size=(len(ident), dim)) / np.sqrt(dim) * spread[:, None]
    v = centers[ident] + common * (1.0 - u)[:, None] * average + noise
    v *= ((10.0 + 25.0 * u) / np.linalg.norm(v, axis=1))[:, None]
    image = np.tile(np.arange(per_identity), n_identities)
    if lfw_paths:
        paths = [f"{root}/{lfw_name(i, k)[1]}" for i, k in zip(ident, image, strict=True)]
        names = [lfw_name(i, 0)[0] for i in ident]
    else:
        paths = [f"{root}/id{i:04d}/img{k}.jpg" for i, k in zip(ident, image, strict=True)]
        names = [f"id{i:04d}" for i in ident]
    vectors = v.astype(np.float32)
    return EmbeddingTable(
        np.asarray(paths, dtype=object),
        np.asarray(names, dtype=object),
        vectors,
        np.linalg.norm(vectors.astype(np.float64), axis=1),
    )


def write_table(table: EmbeddingTable, folder: Path) -> str:
    """Write ``table`` as an embed job output (``folder/embeddings/part-*.parquet``)."""
    write_embeddings(table, str(folder / "embeddings"), rows_per_file=700)
    return str(folder)


def write_lfw_pairs(
    path: Path,
    n_identities: int,
    per_identity: int,
    sets: int = 10,
    per_set: int = 30,
    seed: int = 1,
) -> list[tuple[str, str, int]]:
    """An LFW-format pair file with a ``sets per_set`` header; returns (a, b, label) in order."""
    rng = np.random.default_rng(seed)
    lines = [f"{sets}\t{per_set}"]
    pairs: list[tuple[str, str, int]] = []
    seen: set[frozenset[str]] = set()

    def draw(genuine: bool) -> str:
        while True:
            if genuine:
                i = j = int(rng.integers(n_identities))
                k1, k2 = (int(x) for x in rng.choice(per_identity, size=2, replace=False))
            else:
                i, j = (int(x) for x in rng.choice(n_identities, size=2, replace=False))
                k1, k2 = (int(x) for x in rng.integers(per_identity, size=2))
            (n1, a), (n2, b) = lfw_name(i, k1), lfw_name(j, k2)
            if frozenset((a, b)) not in seen:
                seen.add(frozenset((a, b)))
                pairs.append((a, b, int(genuine)))
                if genuine:
                    return f"{n1}\t{k1 + 1}\t{k2 + 1}"
                return f"{n1}\t{k1 + 1}\t{n2}\t{k2 + 1}"

    for _ in range(sets):
        lines += [draw(True) for _ in range(per_set)]
        lines += [draw(False) for _ in range(per_set)]
    path.write_text("\n".join(lines) + "\n")
    return pairs
