"""Exhaustive pairs: every i < j pair exactly once, scored block-wise, counted without scoring."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from oracle import oracle_cosine

from qmag_ray.embeddings import EmbeddingTable
from qmag_ray.pairs.exhaustive import ExhaustiveSource
from qmag_ray.pairs.source import PairSource


def labelled(n: int, n_ident: int, dim: int = 24, seed: int = 0) -> EmbeddingTable:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ident, dim))
    ident = rng.integers(0, n_ident, n)
    vectors = (centres[ident] + 0.7 * rng.normal(size=(n, dim))) * rng.uniform(8, 35, (n, 1))
    return EmbeddingTable(
        np.asarray([f"{i}.jpg" for i in range(n)], dtype=object),
        np.asarray([f"person{k}" for k in ident], dtype=object),
        vectors.astype(np.float32),
        np.linalg.norm(vectors, axis=1),
    )


def brute_force(table: EmbeddingTable) -> dict[tuple[int, int], tuple[float, float, int]]:
    i, j = np.triu_indices(len(table), k=1)
    cos = oracle_cosine(table.vectors[i], table.vectors[j])  # written out, not qmag_ray's
    q = np.minimum(table.quality[i], table.quality[j]).astype(np.float64)
    y = (table.identity[i] == table.identity[j]).astype(int)
    return {(a, b): (c, p, t) for a, b, c, p, t in zip(i, j, cos, q, y, strict=True)}


def collect(source: ExhaustiveSource) -> tuple[np.ndarray, ...]:
    """All pairs of all shards, with the (i, j) of each pair."""
    rows, cols, cos, qual, lab = [], [], [], [], []
    for s in range(source.num_shards()):
        blocks = list(source.shard_blocks(s))
        where = [ij for bi, bj in source.shard_tiles(s) for ij in source.tile_indices(bi, bj)]
        assert len(blocks) == len(where)
        for (i, j), block in zip(where, blocks, strict=True):
            assert len(i) == len(block.cosine)
            rows.append(i)
            cols.append(j)
            cos.append(block.cosine)
            qual.append(block.quality)
            lab.append(block.label)
    return tuple(np.concatenate(x) for x in (rows, cols, cos, qual, lab))


@pytest.mark.parametrize(
    ("n", "block_size", "shards"), [(57, 10, 4), (57, 64, 3), (40, 7, 40), (700, 300, 3)]
)
def test_blocks_cover_every_pair_once_with_correct_scores(n, block_size, shards) -> None:
    table = labelled(n, n_ident=9)
    source = ExhaustiveSource(table, block_size=block_size, shards=shards)
    assert isinstance(source, PairSource)
    i, j, cos, qual, lab = collect(source)
    assert len(i) == n * (n - 1) // 2 == source.n_pairs
    keys = i * n + j
    assert len(np.unique(keys)) == len(keys)  # every i < j exactly once
    expected = brute_force(table)
    want = np.asarray([expected[(a, b)] for a, b in zip(i, j, strict=True)])
    np.testing.assert_allclose(cos, want[:, 0], rtol=0, atol=2e-6)
    np.testing.assert_allclose(qual, want[:, 1], rtol=1e-6)
    np.testing.assert_array_equal(lab, want[:, 2])
    assert cos.dtype == np.float32 and lab.dtype == np.int8


def test_counts_and_max_quality_without_scoring() -> None:
    table = labelled(83, n_ident=6, seed=2)
    expected = brute_force(table)
    values = np.asarray(list(expected.values()))
    source = ExhaustiveSource(table, block_size=16, shards=5)
    genuine = int(values[:, 2].sum())
    assert source.counts() == (genuine, len(values) - genuine)
    assert source.max_quality() == pytest.approx(values[:, 1].max(), rel=1e-6)
    scored = sum(int(b.label.sum()) for s in range(5) for b in source.shard_blocks(s))
    assert scored == genuine


def test_shards_and_blocks_do_not_change_the_pairs() -> None:
    table = labelled(70, n_ident=5, seed=3)
    one = ExhaustiveSource(table, block_size=16, shards=1)
    many = ExhaustiveSource(table, block_size=16, shards=6)
    assert many.num_shards() == 6 and one.num_shards() == 1
    a = np.concatenate([b.cosine for b in one.shard_blocks(0)])
    b = np.concatenate([blk.cosine for s in range(6) for blk in many.shard_blocks(s)])
    np.testing.assert_array_equal(a, b)  # same tiles, same order, bit-identical
    sizes = [sum(len(blk.cosine) for blk in many.shard_blocks(s)) for s in range(6)]
    target = sum(sizes) / 6  # balanced by pair count, up to one tile (16 x 16 pairs)
    assert all(abs(size - target) <= 16 * 16 for size in sizes)
    assert one.fingerprint() == many.fingerprint() == ExhaustiveSource(table, 64).fingerprint()
    relabelled = EmbeddingTable(
        table.path, table.identity[::-1].copy(), table.vectors, table.quality
    )
    assert ExhaustiveSource(relabelled).fingerprint() != one.fingerprint()


def test_pickles_small_and_whole() -> None:
    table = labelled(50, n_ident=4)
    source = ExhaustiveSource(table, block_size=8, shards=3)
    shipped = pickle.loads(pickle.dumps(source))
    for s in range(3):
        for x, y in zip(source.shard_blocks(s), shipped.shard_blocks(s), strict=True):
            np.testing.assert_array_equal(x.cosine, y.cosine)
    assert len(pickle.dumps(source)) < 2 * table.vectors.nbytes + 10_000


def test_stream_gives_the_blocks_values_in_reused_buffers() -> None:
    # Edge tiles (45 = 2 * 16 + 13 rows) and diagonal strips; each streamed block is compared
    # before the next is requested (it is overwritten then).
    source = ExhaustiveSource(labelled(45, n_ident=5), block_size=16, shards=2)
    for s in range(2):
        blocks = list(source.shard_blocks(s))
        streamed = 0
        for want, got in zip(blocks, source.shard_stream(s), strict=True):
            for field in ("cosine", "quality", "label"):
                assert getattr(got, field).tobytes() == getattr(want, field).tobytes()
            streamed += 1
        assert streamed == len(blocks) > 2


def test_bad_input() -> None:
    table = labelled(10, n_ident=3)
    unlabelled = EmbeddingTable(table.path, None, table.vectors, table.quality)
    with pytest.raises(ValueError, match="10 of 10 embeddings have no identity label"):
        ExhaustiveSource(unlabelled)
    vectors = table.vectors.copy()
    vectors[3] = 0
    with pytest.raises(ValueError, match=r"1 embeddings are NaN/inf, all zero.*'3.jpg'"):
        ExhaustiveSource(EmbeddingTable(table.path, table.identity, vectors, table.quality))
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        ExhaustiveSource(table.take([0]))
    with pytest.raises(IndexError, match="shard 2 out of range"):
        next(ExhaustiveSource(table, block_size=4, shards=2).shard_blocks(2))


@pytest.mark.ray
def test_sources_score_identically_in_ray_tasks(ray_cluster: None) -> None:
    import ray

    from qmag_ray.pairs.generate import generate_pairs
    from qmag_ray.pairs.listed import ListedPairSource

    table = labelled(120, n_ident=10, seed=5)
    sources = [
        ExhaustiveSource(table, block_size=32, shards=3),
        ListedPairSource(table, generate_pairs(table, seed=1), shards=3, block_size=100),
    ]

    @ray.remote
    def shard_sums(source, index: int) -> tuple[float, int, int]:
        blocks = list(source.shard_blocks(index))
        return (
            float(sum(np.asarray(b.cosine, np.float64).sum() for b in blocks)),
            sum(int(b.label.sum()) for b in blocks),
            sum(len(b.label) for b in blocks),
        )

    for source in sources:
        ref = ray.put(source)
        remote = ray.get([shard_sums.remote(ref, s) for s in range(source.num_shards())])
        local = [shard_sums._function(source, s) for s in range(source.num_shards())]
        assert remote == local
        genuine, impostor = source.counts()
        assert sum(r[1] for r in remote) == genuine
        assert sum(r[2] for r in remote) == genuine + impostor
