"""Generated pairs drawn shard by shard (``GeneratedPairSource``): the same pairs as the list."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from qmag_ray.calibration.fit import fit_pairs
from qmag_ray.calibration.result import CalibrationGrid
from qmag_ray.embeddings import EmbeddingTable
from qmag_ray.pairs.generate import generate_pairs
from qmag_ray.pairs.generated import GeneratedPairSource
from qmag_ray.pairs.listed import ListedPairSource


def table(sizes: list[int], seed: int = 0, dim: int = 8) -> EmbeddingTable:
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"id{i:03d}" for i in range(len(sizes))], sizes).astype(object)
    v = rng.normal(size=(len(ids), dim)).astype(np.float32)
    paths = np.array([f"p{i}" for i in range(len(ids))], dtype=object)
    return EmbeddingTable(paths, ids, v, np.linalg.norm(v, axis=1))


def digest(idx_a: np.ndarray, idx_b: np.ndarray, label: np.ndarray) -> str:
    both = np.concatenate([idx_a, idx_b]).astype(np.int64).tobytes()
    return hashlib.sha256(both + label.astype(np.int8).tobytes()).hexdigest()[:16]


# Made with the list generator before the shard-wise one existed (commit ea5090a):
#   PYTHONPATH=<checkout of ea5090a> python -c '...generate_pairs(table(SIZES), m, ips, seed)...'
SIZES = [3, 12, 1, 7, 25, 2, 10, 11, 4]
GOLDEN = {
    (10, 5, 0): (2321, "a0d865f100259999"),
    (4, 2, 7): (200, "e46defd139150e4e"),
    (30, 1, 3): (1491, "47c87ef7e9fb1a3b"),
}


@pytest.mark.parametrize("settings", sorted(GOLDEN))
def test_generate_pairs_is_unchanged(settings: tuple[int, int, int]) -> None:
    r = generate_pairs(table(SIZES), *settings)
    assert (len(r.label), digest(r.idx_a, r.idx_b, r.label)) == GOLDEN[settings]


def _rows(source: GeneratedPairSource) -> list[tuple[int, int, int]]:
    pairs = []
    for s in range(source.num_shards()):
        ia, ib, y = source.shard_pairs(s)
        pairs += list(zip(source.rows[ia], source.rows[ib], y, strict=True))
    return pairs


@pytest.mark.parametrize("settings", sorted(GOLDEN))
def test_shards_draw_exactly_the_listed_pairs(settings: tuple[int, int, int]) -> None:
    t = table(SIZES)
    r = generate_pairs(t, *settings)
    want = sorted(zip(r.idx_a, r.idx_b, r.label, strict=True))
    listed = ListedPairSource(t, r)
    for shards in (1, 2, 4, 9, 50):
        source = GeneratedPairSource(t, *settings, shards=shards, block_size=37)
        assert source.num_shards() <= min(shards, len(SIZES))
        assert sorted(_rows(source)) == want, shards
        assert source.counts() == listed.counts()
        assert source.max_quality() == listed.max_quality()
        blocks = [b for s in range(source.num_shards()) for b in source.shard_blocks(s)]
        cos = np.sort(np.concatenate([b.cosine for b in blocks]))
        np.testing.assert_array_equal(cos, np.sort(listed.arrays()[0]))  # the same scores
        for got, expected in zip(source.arrays(), listed.arrays(), strict=True):
            np.testing.assert_array_equal(got, expected)  # in list order for metrics


def test_calibration_on_drawn_shards_equals_the_list() -> None:
    """Enough pairs for a real grid (300 identities x 12 images): identical parameters."""
    t = table([12] * 300, seed=3, dim=16)
    grid = CalibrationGrid(n_fmr=10, fmr_min=1e-3, n_weights=8)
    listed = fit_pairs(ListedPairSource(t, generate_pairs(t, 10, 5, 4)), grid)
    for shards in (1, 7):
        drawn = fit_pairs(GeneratedPairSource(t, 10, 5, 4, shards=shards), grid)
        assert (drawn.alpha, drawn.beta) == (listed.alpha, listed.beta)
        assert drawn.optimal_thresholds == listed.optimal_thresholds
        assert drawn.thresholds == listed.thresholds


def test_bounded_draws_in_pieces_equal_one_call() -> None:
    """What the shard-wise replay relies on (numpy's Generator.integers with array bounds)."""
    high = np.random.default_rng(1).integers(2, 5_000_000_000, 50_001)
    one = np.random.default_rng(5).integers(0, high)
    rng = np.random.default_rng(5)
    cuts = [0, 1, 2, 7, 1_000, 33_333, 50_001]
    parts = [rng.integers(0, high[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    np.testing.assert_array_equal(one, np.concatenate(parts))
