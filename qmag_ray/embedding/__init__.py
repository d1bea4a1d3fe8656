"""The embedding stage: face images in storage -> MagFace embeddings in Parquet, on Ray Data.

``run_embed(EmbedConfig(...))`` is the whole job; ``qmag-ray embed`` is its command line.
Public names resolve on first use: importing the package (for ``EmbedConfig``) reads no image
library and no Ray.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "EmbedConfig": "qmag_ray.embedding.config",
    "EmbedError": "qmag_ray.embedding.config",
    "run_embed": "qmag_ray.embedding.job",
    "EmbedSummary": "qmag_ray.embedding.output",
    "OutputLayout": "qmag_ray.embedding.output",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qmag_ray.embedding' has no attribute {name!r}")
