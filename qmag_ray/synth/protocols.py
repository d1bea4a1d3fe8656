"""Synthetic embeddings and metadata shaped like the template and identification protocols.

No images: MagFace-like raw embeddings are drawn directly (norm ``10 + 25 u`` for a latent
quality ``u`` in [0, 1]; angular noise growing as ``u`` falls; low-quality images drifting
towards a shared direction, as low-quality faces look alike), so the template, verification and
identification code can be run end to end at any scale. Two layouts:

- ``ijb_like``: subjects -> templates -> media -> frames, written as IJB-C's metadata
  (``ijbc_face_tid_mid.txt``: ``image template_id media_id``; ``ijbc_template_pair_label.txt``:
  ``t1 t2 label``) next to an ``embeddings/`` table whose paths are the image names;
- ``identification_like``: a gallery (``gallery.csv``: ``path, identity``; distractors have an
  empty identity), probes (``probes.csv``: ``path, identity, subset``) of enrolled and of
  unenrolled subjects, the subset naming the probe's quality band (d1 best ... d3 worst, like
  SCface's distances).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from qmag_ray import storage
from qmag_ray.embeddings import EmbeddingTable, write_embeddings


@dataclass(frozen=True)
class EmbeddingModel:
    """How synthetic embeddings depend on quality (see the module docstring)."""

    dim: int = 128
    common: float = 0.6
    noise_lo: float = 0.9
    noise_hi: float = 3.0

    def draw(
        self,
        rng: np.random.Generator,
        centers: np.ndarray,
        u: np.ndarray,
        average: np.ndarray,
        offset: np.ndarray | None = None,
    ) -> np.ndarray:
        """Raw float32 embeddings around ``centers`` (one row per image) for qualities ``u``."""
        spread = self.noise_lo + (self.noise_hi - self.noise_lo) * (1.0 - u)
        noise = rng.normal(size=centers.shape) / np.sqrt(self.dim) * spread[:, None]
        v = centers + self.common * (1.0 - u)[:, None] * average + noise
        if offset is not None:
            v = v + offset
        v *= ((10.0 + 25.0 * u) / np.linalg.norm(v, axis=1))[:, None]
        return v.astype(np.float32)


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclass(frozen=True)
class IJBLike:
    """An IJB-like set in memory: embeddings, template table rows and template pairs."""

    embeddings: EmbeddingTable
    tid_mid: pd.DataFrame  # image, template, media (ints as in IJB)
    pairs: pd.DataFrame  # t1, t2, label
    subject_of_template: np.ndarray


def ijb_like(
    subjects: int = 200,
    templates_per_subject: tuple[int, int] = (2, 4),
    media_per_template: tuple[int, int] = (1, 3),
    frames_per_media: tuple[int, int] = (1, 4),
    impostor_pairs: int = 20_000,
    seed: int = 0,
    model: EmbeddingModel | None = None,
) -> IJBLike:
    """Subjects with several templates of several media of several frames (ranges inclusive).

    Every genuine template pair (same subject) is listed, and ``impostor_pairs`` distinct
    template pairs of different subjects, drawn at random; pairs are shuffled like IJB's file.
    """
    model = model or EmbeddingModel()
    rng = np.random.default_rng(seed)
    centers = _unit(rng, subjects, model.dim)
    average = _unit(rng, 1, model.dim)[0]
    n_t = rng.integers(templates_per_subject[0], templates_per_subject[1] + 1, subjects)
    t_subject = np.repeat(np.arange(subjects), n_t)
    n_m = rng.integers(media_per_template[0], media_per_template[1] + 1, len(t_subject))
    m_template = np.repeat(np.arange(len(t_subject)), n_m)
    n_f = rng.integers(frames_per_media[0], frames_per_media[1] + 1, len(m_template))
    i_media = np.repeat(np.arange(len(m_template)), n_f)
    i_template = m_template[i_media]
    i_subject = t_subject[i_template]
    # frames of one media share a pose offset and most of their quality
    m_offset = rng.normal(size=(len(m_template), model.dim)) * (0.2 / np.sqrt(model.dim))
    m_u = rng.uniform(0.0, 1.0, len(m_template))
    u = np.clip(m_u[i_media] + rng.normal(0.0, 0.1, len(i_media)), 0.0, 1.0)
    vectors = model.draw(rng, centers[i_subject], u, average, m_offset[i_media])
    names = np.array([f"{k + 1}.jpg" for k in range(len(i_media))], dtype=object)
    table = EmbeddingTable(
        names,
        None,
        vectors,
        np.linalg.norm(vectors.astype(np.float64), axis=1),
    )
    tid_mid = pd.DataFrame({"image": names, "template": i_template + 1, "media": 10_000 + i_media})
    genuine = []
    start = 0
    for s in range(subjects):
        ts = np.arange(start, start + n_t[s])
        start += n_t[s]
        for i in range(len(ts)):
            for j in range(i + 1, len(ts)):
                genuine.append((ts[i], ts[j]))
    gen = np.asarray(genuine, dtype=np.int64).reshape(-1, 2)
    n_templates = len(t_subject)
    imp = _impostors(rng, t_subject, impostor_pairs, n_templates)
    both = np.concatenate([gen, imp])
    label = np.r_[np.ones(len(gen), np.int8), np.zeros(len(imp), np.int8)]
    order = rng.permutation(len(both))
    pairs = pd.DataFrame(
        {"t1": both[order, 0] + 1, "t2": both[order, 1] + 1, "label": label[order]}
    )
    return IJBLike(table, tid_mid, pairs, t_subject)


def _impostors(
    rng: np.random.Generator, subject: np.ndarray, n: int, n_templates: int
) -> np.ndarray:
    """``n`` distinct unordered template pairs of different subjects."""
    if n == 0:
        return np.empty((0, 2), dtype=np.int64)
    out = np.empty((0, 2), dtype=np.int64)
    while len(out) < n:
        a = rng.integers(0, n_templates, 2 * n)
        b = rng.integers(0, n_templates, 2 * n)
        ok = subject[a] != subject[b]
        lo, hi = np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])
        out = np.unique(np.concatenate([out, np.stack([lo, hi], axis=1)]), axis=0)
    return out[rng.permutation(len(out))[:n]]


def write_ijb_like(data: IJBLike, output: str, prefix: str = "ijbc") -> dict[str, str]:
    """Write ``embeddings/`` and the IJB metadata files (tid_mid, template_pair_label)."""
    files = {"embeddings": storage.join(output, "embeddings")}
    write_embeddings(data.embeddings, files["embeddings"], rows_per_file=50_000)
    tid = storage.join(output, f"{prefix}_face_tid_mid.txt")
    _write_frame(tid, data.tid_mid, sep=" ", header=False)
    pairs = storage.join(output, f"{prefix}_template_pair_label.txt")
    _write_frame(pairs, data.pairs, sep=" ", header=False)
    files.update({"templates": tid, "pairs": pairs})
    return files


@dataclass(frozen=True)
class IdentificationLike:
    """Gallery and probe lists and the embeddings of all their images."""

    embeddings: EmbeddingTable
    gallery: pd.DataFrame  # path, identity ('' for distractors)
    probes: pd.DataFrame  # path, identity, subset


SUBSET_QUALITY = {"d1": (0.6, 1.0), "d2": (0.3, 0.7), "d3": (0.0, 0.4)}
"""Latent quality range of the probes of each subset (d1 best, d3 worst)."""


def identification_like(
    enrolled: int = 200,
    gallery_per_identity: int = 1,
    distractors: int = 1000,
    probes_per_identity: int = 3,
    unenrolled: int = 100,
    seed: int = 0,
    model: EmbeddingModel | None = None,
) -> IdentificationLike:
    """A gallery of high-quality enrolment images plus distractors, and probes per subset.

    Each enrolled subject has ``gallery_per_identity`` gallery images (quality 0.7-1, a
    mugshot) and ``probes_per_identity`` probes in each subset; ``unenrolled`` other subjects
    have probes only (their identity is not in the gallery: open-set non-mated searches).
    """
    model = model or EmbeddingModel()
    rng = np.random.default_rng(seed)
    n_subj = enrolled + unenrolled + distractors
    centers = _unit(rng, n_subj, model.dim)
    average = _unit(rng, 1, model.dim)[0]
    paths: list[str] = []
    rows_c: list[np.ndarray] = []
    rows_u: list[np.ndarray] = []
    gallery = {"path": [], "identity": []}
    for s in range(enrolled):
        for k in range(gallery_per_identity):
            gallery["path"].append(f"gallery/id{s:05d}/{k}.jpg")
            gallery["identity"].append(f"id{s:05d}")
    g_subj = np.repeat(np.arange(enrolled), gallery_per_identity)
    for d in range(distractors):
        gallery["path"].append(f"distractors/{d:06d}.jpg")
        gallery["identity"].append("")
    g_subj = np.r_[g_subj, enrolled + unenrolled + np.arange(distractors)]
    paths += gallery["path"]
    rows_c.append(centers[g_subj])
    rows_u.append(rng.uniform(0.7, 1.0, len(g_subj)))
    probes = {"path": [], "identity": [], "subset": []}
    p_subj = []
    for subset, (lo, hi) in SUBSET_QUALITY.items():
        for s in range(enrolled + unenrolled):
            for k in range(probes_per_identity):
                probes["path"].append(f"probes/{subset}/id{s:05d}_{k}.jpg")
                probes["identity"].append(f"id{s:05d}")
                probes["subset"].append(subset)
                p_subj.append(s)
        n = (enrolled + unenrolled) * probes_per_identity
        rows_u.append(rng.uniform(lo, hi, n))
    p_subj_arr = np.asarray(p_subj, dtype=np.int64)
    rows_c.append(centers[p_subj_arr])
    paths += probes["path"]
    u = np.concatenate(rows_u)
    vectors = model.draw(rng, np.concatenate(rows_c), u, average)
    identity = [x or None for x in gallery["identity"]] + probes["identity"]
    table = EmbeddingTable(
        np.asarray(paths, dtype=object),
        np.asarray(identity, dtype=object),
        vectors,
        np.linalg.norm(vectors.astype(np.float64), axis=1),
    )
    return IdentificationLike(table, pd.DataFrame(gallery), pd.DataFrame(probes))


def write_identification_like(data: IdentificationLike, output: str) -> dict[str, str]:
    """Write ``embeddings/``, ``gallery.csv`` and ``probes.csv`` under ``output``."""
    files = {
        "embeddings": storage.join(output, "embeddings"),
        "gallery": storage.join(output, "gallery.csv"),
        "probes": storage.join(output, "probes.csv"),
    }
    write_embeddings(data.embeddings, files["embeddings"], rows_per_file=100_000)
    for key, frame in (("gallery", data.gallery), ("probes", data.probes)):
        _write_frame(files[key], frame)
    return files


def _write_frame(uri: str, frame: pd.DataFrame, **kwargs: object) -> None:
    with storage.atomic_open(uri) as f:
        f.write(frame.to_csv(index=False, **kwargs).encode("utf-8"))
