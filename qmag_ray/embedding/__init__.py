"""The embedding stage: face images in storage -> MagFace embeddings in Parquet, on Ray Data.

``run_embed(EmbedConfig(...))`` is the whole job; ``qmag-ray embed`` is its command line.
Public names resolve on first use: importing the package (for ``EmbedConfig``) reads no image
library and no Ray.
"""

from __future__ import annotations

from qmag_ray._lazy import lazy_exports

_LAZY = {
    "EmbedConfig": "qmag_ray.embedding.config",
    "EmbedError": "qmag_ray.embedding.config",
    "run_embed": "qmag_ray.embedding.job",
    "EmbedSummary": "qmag_ray.embedding.output",
    "OutputLayout": "qmag_ray.embedding.output",
}

__all__ = list(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
