"""Generated calibration pairs as a ``PairSource`` whose shards draw their own identities' pairs.

The pairs are exactly those of ``generate.generate_pairs`` for the same table, settings and
seed (the same multiset; within a shard, genuine pairs first, then their impostors), but no
list of them is ever built: each shard is a contiguous group of identities (balanced by pair
count) that draws its genuine pairs and impostor partners itself, from the generator state at
the start of its identities' impostor draws. The constructor finds those states, and the
largest pair quality, by replaying the draws once in pieces of about 2**20 pairs (time linear
in the pairs, unscored; memory O(images)); a shard's pairs do not depend on how many shards
there are. Counts come from the drawn members.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from qmag_ray.embeddings import EmbeddingTable
from qmag_ray.pairs.generate import draw_identities, draw_plan
from qmag_ray.pairs.listed import score_block
from qmag_ray.pairs.source import PairBlock


class GeneratedPairSource:
    """Pairs generated from identity labels (spec section 5), drawn shard by shard."""

    def __init__(
        self,
        table: EmbeddingTable,
        max_per_identity: int = 10,
        impostors_per_side: int = 5,
        seed: int = 0,
        shards: int = 1,
        block_size: int = 1 << 14,
    ) -> None:
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        plan = draw_plan(table, max_per_identity, impostors_per_side, seed)
        # Keep only the drawn rows (vectors of the pool), re-indexed.
        used = np.unique(plan.pool)
        remap = np.full(len(table), -1, np.int64)
        remap[used] = np.arange(len(used))
        codes = np.full(len(used), -1, np.int64)
        codes[:] = plan.codes[used]
        self.plan = type(plan)(
            codes, remap[plan.pool], plan.start, plan.sizes, plan.impostors_per_side, plan.state
        )
        self.rows = used  # the table row of each of this source's vectors
        self.vectors = np.ascontiguousarray(table.vectors[used])
        self.quality = np.ascontiguousarray(table.quality[used])
        self.block_size = int(block_size)
        genuine = self.plan.genuine_counts()
        self._counts = (int(genuine.sum()), int(2 * impostors_per_side * genuine.sum()))
        self._groups = self._split(genuine * (1 + 2 * impostors_per_side), shards)
        self._states, self._max_quality = self._replay(seed)
        digest = hashlib.sha256(b"generated-pairs\0")
        digest.update(table.fingerprint().encode())
        digest.update(json.dumps([max_per_identity, impostors_per_side, seed]).encode())
        self._fingerprint = digest.hexdigest()[:16]

    @staticmethod
    def _split(weight: np.ndarray, shards: int) -> np.ndarray:
        """Identity boundaries of ``shards`` contiguous groups of near-equal pair counts."""
        before = np.cumsum(weight) - weight
        total = max(int(weight.sum()), 1)
        group = np.minimum(shards - 1, (shards * (before + weight / 2)) // total).astype(np.int64)
        starts = np.flatnonzero(np.diff(group, prepend=-1))
        return np.append(starts, len(weight)).astype(np.int64)

    def _replay(self, seed: int) -> tuple[list[dict[str, Any]], float]:
        """The generator state at the start of each group's impostor draws, and the largest
        pair quality, from one replay of the draws in pieces of about 2**20 pairs."""
        rng = np.random.default_rng(seed)
        rng.bit_generator.state = self.plan.state
        weight = self.plan.genuine_counts() * (1 + 2 * self.plan.impostors_per_side)
        cuts = set(self._groups.tolist())
        run = 0
        for k, w in enumerate(weight):  # piece boundaries: every ~2**20 pairs
            if run >= 1 << 20:
                cuts.add(k)
                run = 0
            run += int(w)
        bounds = sorted(cuts)
        groups = set(self._groups[:-1].tolist())
        states, best = [], -np.inf
        for first, stop in zip(bounds[:-1], bounds[1:], strict=True):
            if first in groups:
                states.append(rng.bit_generator.state)
            ga, gb, anchor, partner = draw_identities(self.plan, first, stop, rng)
            for a, b in ((ga, gb), (anchor, partner)):
                if len(a):
                    best = max(best, float(np.minimum(self.quality[a], self.quality[b]).max()))
        return states, best

    def num_shards(self) -> int:
        return len(self._groups) - 1

    def shard_pairs(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row a, row b, label) of shard ``index``: its genuine pairs, then their impostors.
        Rows index this source's ``vectors``."""
        if not 0 <= index < self.num_shards():
            raise IndexError(f"shard {index} out of range 0..{self.num_shards() - 1}")
        rng = np.random.default_rng()
        rng.bit_generator.state = self._states[index]
        first, stop = int(self._groups[index]), int(self._groups[index + 1])
        ga, gb, anchor, partner = draw_identities(self.plan, first, stop, rng)
        label = np.concatenate([np.ones(len(ga), np.int8), np.zeros(len(anchor), np.int8)])
        return np.concatenate([ga, anchor]), np.concatenate([gb, partner]), label

    def shard_blocks(self, index: int) -> Iterator[PairBlock]:
        ia, ib, label = self.shard_pairs(index)
        for a in range(0, len(label), self.block_size):
            b = slice(a, a + self.block_size)
            yield score_block(self.vectors, self.quality, ia[b], ib[b], label[b])

    def counts(self) -> tuple[int, int]:
        return self._counts

    def max_quality(self) -> float:
        """Largest pair quality over the pairs (found while replaying the draws)."""
        return self._max_quality

    def fingerprint(self) -> str:
        """Short sha256 of the table fingerprint and the generation settings and seed."""
        return self._fingerprint

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All pairs' (cosine, pair quality, label) in ``generate_pairs``' list order (for
        in-memory metrics)."""
        blocks = [b for i in range(self.num_shards()) for b in self.shard_blocks(i)]
        cos, q, y = (
            np.concatenate([getattr(b, k) for b in blocks]) for k in ("cosine", "quality", "label")
        )
        return list_order(cos, q, y)


def list_order(
    cosine: np.ndarray, quality: np.ndarray, label: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shard-ordered scores of a ``GeneratedPairSource`` (per shard: genuine, then impostors;
    shards in identity order) put in list order: every genuine pair, then every impostor."""
    order = np.argsort(1 - np.asarray(label, np.int8), kind="stable")
    return cosine[order], quality[order], label[order]
