"""The embedding stage: face images in storage -> MagFace embeddings in Parquet, on Ray Data.

``run_embed(EmbedConfig(...))`` is the whole job; ``qmag-ray embed`` is its command line.
"""

from qmag_ray.embedding.config import EmbedConfig, EmbedError
from qmag_ray.embedding.job import run_embed
from qmag_ray.embedding.output import EmbedSummary, OutputLayout

__all__ = ["EmbedConfig", "EmbedError", "EmbedSummary", "OutputLayout", "run_embed"]
