"""Scoring the pairs of a pair source into arrays, on Ray tasks or in this process.

``pair_arrays`` gives (cosine, pair quality, label) of every pair of a ``ListedPairSource`` or
``GeneratedPairSource`` in list order, one Ray task per shard when asked (the sources' numpy
code runs in the tasks). Ray is connected by the entry point and imported only here, inside
the call.
"""

from __future__ import annotations

import numpy as np

from qmag_ray.pairs.generated import GeneratedPairSource, list_order
from qmag_ray.pairs.listed import ListedPairSource


def _score_shard(source: ListedPairSource, index: int) -> tuple[np.ndarray, ...]:
    blocks = list(source.shard_blocks(index))
    if not blocks:
        return np.empty(0), np.empty(0), np.empty(0, dtype=np.int8)
    return tuple(
        np.concatenate([getattr(b, k) for b in blocks]) for k in ("cosine", "quality", "label")
    )


def pair_arrays(
    source: ListedPairSource | GeneratedPairSource, *, use_ray: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine, pair quality, label) of every pair, in list order."""
    if not use_ray or source.num_shards() == 1:
        return source.arrays()
    import ray

    task = ray.remote(_score_shard)
    ref = ray.put(source)
    parts = ray.get([task.remote(ref, i) for i in range(source.num_shards())])
    cos, q, y = (np.concatenate([p[k] for p in parts]) for k in range(3))
    if isinstance(source, GeneratedPairSource):
        return list_order(cos, q, y)
    return cos, q, y


def shuffled_for_folds(
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generated pairs come genuine-first; a seeded permutation makes 10-fold splits mixed."""
    perm = np.random.default_rng(seed).permutation(len(arrays[0]))
    return arrays[0][perm], arrays[1][perm], arrays[2][perm]
