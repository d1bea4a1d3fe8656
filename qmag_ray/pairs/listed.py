"""A ``PairSource`` over listed pairs (benchmark, generic or generated), scored per block.

The source keeps only the table rows its pairs use (numpy arrays, no files), so it pickles
small and ships cheaply to Ray tasks; cosine scores are computed in float64 in ``shard_blocks``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from qmag_ray import scores
from qmag_ray.embeddings import SHOW, EmbeddingTable
from qmag_ray.pairs.resolve import ResolvedPairs
from qmag_ray.pairs.source import PairBlock

FLOAT64_ROWS_BYTES = 512 * 2**20
"""Largest float64 copy of the used rows a listed source keeps (see ``ListedPairSource``)."""


def score_block(
    vectors: np.ndarray, quality: np.ndarray, ia: np.ndarray, ib: np.ndarray, label: np.ndarray
) -> PairBlock:
    """The block of pairs (rows ``ia[i]``, ``ib[i]``): float64 cosine and pair quality (each
    pair's scores do not depend on the other pairs of the block)."""
    return PairBlock(
        cosine=scores.cosine(vectors[ia], vectors[ib]),
        quality=scores.pair_quality(quality[ia], quality[ib]),
        label=label,
    )


class ListedPairSource:
    """Listed pairs cut into ``shards`` contiguous shards of blocks of ``block_size`` pairs."""

    def __init__(
        self,
        table: EmbeddingTable,
        resolved: ResolvedPairs,
        shards: int = 1,
        block_size: int = 1 << 14,
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        n = len(resolved)
        both = np.concatenate([resolved.idx_a, resolved.idx_b])
        if n and (both.min() < 0 or both.max() >= len(table)):
            raise ValueError(
                f"pair indices run from {both.min()} to {both.max()} but the embeddings table "
                f"has {len(table)} rows: the pairs were resolved against another table"
            )
        used, inverse = np.unique(both, return_inverse=True)
        bad = used[np.isin(used, table.bad_rows())]
        if bad.size:
            shown = ", ".join(repr(str(p)) for p in table.path[bad[:SHOW]])
            raise ValueError(
                f"{bad.size} image(s) used by the pairs have NaN/inf, all-zero embeddings or a bad "
                f"quality ({shown}); skip them explicitly (EmbeddingTable.validate(policy='skip') "
                "or resolve_pairs(on_bad_embedding='skip'))"
            )
        self.vectors = np.ascontiguousarray(table.vectors[used])
        self.quality = np.ascontiguousarray(table.quality[used])
        # Scoring many pairs over few rows (templates: 15.6M IJB-C pairs over 23k templates)
        # gathers the same rows again and again: keep them in float64 (the exact widening
        # score_block does per block) with their norms, up to FLOAT64_ROWS_BYTES.
        self._v64 = self._norm = None
        if self.vectors.size * 8 <= FLOAT64_ROWS_BYTES and len(used) < n:
            self._v64 = self.vectors.astype(np.float64)
            self._norm = scores.norms(self._v64)
        self.idx_a = inverse[:n].astype(np.int64)
        self.idx_b = inverse[n:].astype(np.int64)
        self.label = np.asarray(resolved.label, dtype=np.int8)
        wrong = np.flatnonzero(~np.isin(self.label, (0, 1)))
        if wrong.size:
            raise ValueError(f"labels must be 0/1; pair {int(wrong[0])} has {self.label[wrong[0]]}")
        self._shards = min(shards, max(1, n))
        self._block = block_size
        self._bounds = np.linspace(0, n, self._shards + 1).astype(np.int64)
        digest = hashlib.sha256(b"listed-pairs\0")
        digest.update("\0".join(str(p) for p in table.path[used]).encode("utf-8"))
        for arr in (self.vectors, self.quality, self.idx_a, self.idx_b, self.label):
            digest.update(np.ascontiguousarray(arr).tobytes())
        self._fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.label)

    def num_shards(self) -> int:
        return self._shards

    def shard_blocks(self, index: int) -> Iterator[PairBlock]:
        if not 0 <= index < self._shards:
            raise IndexError(f"shard {index} out of range 0..{self._shards - 1}")
        lo, hi = int(self._bounds[index]), int(self._bounds[index + 1])
        for start in range(lo, hi, self._block):
            yield self._score(slice(start, min(hi, start + self._block)))

    def _score(self, rows: slice) -> PairBlock:
        ia, ib = self.idx_a[rows], self.idx_b[rows]
        if self._v64 is None:
            return score_block(self.vectors, self.quality, ia, ib, self.label[rows])
        # the same float64 operations as scores.cosine, with the rows' norms computed once
        dots = np.einsum("ij,ij->i", self._v64[ia], self._v64[ib])
        return PairBlock(
            cosine=dots / (self._norm[ia] * self._norm[ib]),
            quality=scores.pair_quality(self.quality[ia], self.quality[ib]),
            label=self.label[rows],
        )

    def counts(self) -> tuple[int, int]:
        genuine = int(self.label.sum())
        return genuine, len(self.label) - genuine

    def max_quality(self) -> float:
        if not len(self.label):
            return 0.0
        return float(np.minimum(self.quality[self.idx_a], self.quality[self.idx_b]).max())

    def fingerprint(self) -> str:
        """Short sha256 of the used paths, vectors, qualities, pair indices and labels."""
        return self._fingerprint

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All pairs' (cosine float64, pair quality float64, label int8), in list order."""
        blocks = [self._score(slice(s, s + self._block)) for s in range(0, len(self), self._block)]
        if not blocks:
            return np.empty(0), np.empty(0), np.empty(0, dtype=np.int8)
        return (
            np.concatenate([b.cosine for b in blocks]),
            np.concatenate([b.quality for b in blocks]),
            np.concatenate([b.label for b in blocks]),
        )


def score_pairs(
    table: EmbeddingTable, resolved: ResolvedPairs
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine (float64), pair quality (float64) and label (int8) of every pair, in order."""
    return ListedPairSource(table, resolved).arrays()
