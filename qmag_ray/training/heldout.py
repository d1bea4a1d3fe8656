"""In-process check of a trained model on held-out labelled images with known degradation.

It answers the two questions a MagFace model must pass before a demo uses it: do embedding
norms fall with degradation (Spearman correlation), and does QMagFace, calibrated on one half
of the identities, beat cosine on the other half (FNMR at fixed FMR, all pairs)? The full
pipeline (Ray embedding, calibration and evaluation jobs) answers the same at scale; this is a
small single-process version for model development.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from qmag_ray import storage
from qmag_ray.images import decode_face, to_input

logger = logging.getLogger(__name__)


def embed_images(
    model: torch.nn.Module, root: str, paths: list[str], batch: int = 256
) -> np.ndarray:
    """Embeddings (float64) of the images ``root/paths`` with the embedding job's preprocessing."""
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            faces = np.stack(
                [
                    decode_face(storage.read_bytes(storage.join(root, p)))
                    for p in paths[i : i + batch]
                ]
            )
            out.append(model(torch.from_numpy(to_input(faces))).double().numpy())
            logger.info("embedded %d/%d", min(i + batch, len(paths)), len(paths))
    return np.concatenate(out)


def all_pairs(emb: np.ndarray, identity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine, pair quality (lower norm) and label of every unordered pair of rows."""
    norm = np.linalg.norm(emb, axis=1)
    unit = emb / norm[:, None]
    i, j = np.triu_indices(len(emb), 1)
    cos = np.einsum("ij,ij->i", unit[i], unit[j])
    return cos, np.minimum(norm[i], norm[j]), (identity[i] == identity[j]).astype(np.int8)


def heldout_report(
    checkpoint: str,
    data: str,
    *,
    arch: str = "iresnet-demo",
    fmrs: tuple[float, ...] = (1e-2, 1e-3),
    calibration_impostor_fraction: float = 0.25,
    fmr_range: tuple[float, float] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Norm-degradation correlation and cosine-vs-QMagFace FNMR on a synthetic set ``data``.

    Identities are split in two halves (sorted names): QMagFace is calibrated with
    :func:`qmag_ray.fit_qmagface` on all genuine and a random ``calibration_impostor_fraction``
    of impostor pairs of the first half (search grid over ``fmr_range``, by default the paper's
    1e-5..1e-2 as far as the pairs can measure it), and evaluated on all pairs of the second.
    """
    from scipy.stats import spearmanr

    from qmag_ray.calibration.fit import fit_qmagface
    from qmag_ray.metrics import fnmr_at_fmr
    from qmag_ray.model import load_backbone
    from qmag_ray.scores import qmagface_score

    manifest = pd.read_parquet(storage.join(data, "manifest.parquet"))
    model = load_backbone(checkpoint, arch)
    emb = embed_images(model, data, manifest["path"].tolist())
    norm = np.linalg.norm(emb, axis=1)
    identity = manifest["identity"].to_numpy()
    degradation = manifest["degradation"].to_numpy()
    names = np.unique(identity)
    calib = np.isin(identity, names[: len(names) // 2])
    test = ~calib
    cos, q, lab = all_pairs(emb[calib], identity[calib])
    keep = (lab == 1) | (
        np.random.default_rng(seed).random(len(lab)) < calibration_impostor_fraction
    )
    n_impostor = int(keep.sum() - lab[keep].sum())
    if fmr_range is None:  # the paper's grid, where the data allows
        low = max(1e-5, 1.0 / max(n_impostor, 1))
        fmr_range = (low, max(1e-2, 10 * low))
    fitted = fit_qmagface(cos[keep], q[keep], lab[keep], fmr_min=fmr_range[0], fmr_max=fmr_range[1])
    cos, q, lab = all_pairs(emb[test], identity[test])
    f_cos = fnmr_at_fmr(cos, lab, fmrs)
    f_q = fnmr_at_fmr(qmagface_score(cos, q, fitted.alpha, fitted.beta), lab, fmrs)
    return {
        "spearman_norm_degradation": float(spearmanr(norm[test], degradation[test])[0]),
        "norm_mean": float(norm.mean()),
        "norm_min": float(norm.min()),
        "norm_max": float(norm.max()),
        "alpha": float(fitted.alpha),
        "beta": float(fitted.beta),
        "test_genuine": int(lab.sum()),
        "test_impostor": int(len(lab) - lab.sum()),
        "fnmr": {
            f"{f:g}": {"cosine": float(a), "qmagface": float(b)}
            for f, a, b in zip(fmrs, f_cos, f_q, strict=True)
        },
    }
