"""Training data: labelled face images from a manifest or an ``<identity>/<file>`` tree.

Images are decoded and turned into network input by :mod:`qmag_ray.images`, the same code the
embedding job uses (BGR, /255, NCHW, no mean/std), so a trained network sees at embedding time
exactly what it saw in training. Images that fail to decode are skipped per batch and counted.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from qmag_ray import storage
from qmag_ray.embedding.inputs import list_tree, read_manifest
from qmag_ray.images import ImageError, decode_face, to_input

logger = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.parquet", "manifest.csv")


class TrainingDataError(ValueError):
    """Training data that cannot be used; the message names the source and the problem."""


@dataclass(frozen=True)
class LabelledImages:
    """Images with class labels: ``paths`` relative to ``root``, ``labels`` index ``classes``."""

    root: str
    paths: list[str]
    labels: np.ndarray
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)


def _manifest_in(source: str) -> str | None:
    for name in MANIFEST_NAMES:
        uri = storage.join(source, name)
        if storage.exists(uri):
            return uri
    return None


def list_labelled_images(source: str) -> LabelledImages:
    """Labelled images of ``source``: a manifest file, a folder holding ``manifest.parquet``
    (or ``.csv``), or a folder tree ``<identity>/<image>``.

    Raises:
        TrainingDataError: no images, images without identity, or fewer than two identities.
    """
    where = storage.redact(source)
    lower = source.lower()
    if lower.endswith((".parquet", ".pq", ".csv", ".csv.gz")):
        manifest: str | None = source
    else:
        if not storage.exists(source):
            raise TrainingDataError(f"training data not found: {where}")
        manifest = _manifest_in(source)
    if manifest is not None:
        table = read_manifest(manifest)
        root = storage.unstrip(manifest, posixpath.dirname(storage.filesystem(manifest)[1]))
    else:
        inputs = list_tree(source)
        table, root = inputs.table, inputs.root
        if inputs.ignored:
            logger.info("%s: %d non-image files ignored", where, len(inputs.ignored))
    missing = table["identity"].isna()
    if missing.any():
        examples = ", ".join(table.loc[missing, "path"].head(3))
        raise TrainingDataError(
            f"{where}: {int(missing.sum())} images have no identity (e.g. {examples}); training "
            "needs an identity column in the manifest or <identity>/<image> folders"
        )
    codes, classes = pd.factorize(table["identity"], sort=True)
    if len(classes) < 2:
        raise TrainingDataError(
            f"{where}: training needs at least 2 identities, found {len(classes)}"
        )
    logger.info("%s: %d images of %d identities", where, len(table), len(classes))
    return LabelledImages(
        root=root,
        paths=table["path"].tolist(),
        labels=codes.astype(np.int64),
        classes=[str(c) for c in classes],
    )


class FaceDataset(Dataset):
    """Decoded faces as network input ``(3, 112, 112)`` float32 and their labels.

    An image that cannot be read or decoded yields ``None`` (logged); :func:`collate` drops it
    and counts it, so one bad file does not stop a training run.
    """

    def __init__(self, images: LabelledImages, *, flip: bool = False, seed: int = 0) -> None:
        self.images = images
        self.flip = flip
        self._rng = np.random.default_rng(seed)
        self._fs, self._root = storage.filesystem(images.root)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        rel = self.images.paths[index]
        path = posixpath.join(self._root.rstrip("/"), rel)
        try:
            with self._fs.open(path, "rb") as f:
                face = decode_face(f.read())
        except (OSError, ImageError) as exc:
            logger.warning("skipping %s: %s", rel, exc)
            return None
        if self.flip and self._rng.random() < 0.5:
            face = face[:, ::-1]
        x = torch.from_numpy(to_input(np.ascontiguousarray(face)[None])[0])
        return x, int(self.images.labels[index])


def collate(
    items: list[tuple[torch.Tensor, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack a batch, dropping unreadable images; returns ``(x, labels, n_skipped)``."""
    good = [item for item in items if item is not None]
    skipped = len(items) - len(good)
    if not good:
        return torch.empty(0, 3, 112, 112), torch.empty(0, dtype=torch.long), skipped
    x = torch.stack([item[0] for item in good])
    y = torch.tensor([item[1] for item in good], dtype=torch.long)
    return x, y, skipped
