"""The contract between pair producers and calibration: sources of pair blocks, in shards.

A ``PairSource`` knows, cheaply, how many genuine and impostor pairs it holds and their largest
pair quality (what the weight grid needs), and yields its pairs as ``PairBlock`` arrays shard by
shard. Shards are independent: calibration runs one Ray task per shard, or all of them in one
process, and gets the same result either way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class PairBlock:
    """Scores of a batch of pairs: cosine, pair quality (min of the two norms), label (1/0)."""

    cosine: np.ndarray
    quality: np.ndarray
    label: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.cosine)
        if len(self.quality) != n or len(self.label) != n:
            raise ValueError(
                f"pair block arrays differ in length: cosine {n}, quality {len(self.quality)}, "
                f"label {len(self.label)}"
            )


@runtime_checkable
class PairSource(Protocol):
    """Pairs to calibrate or evaluate on, produced shard by shard."""

    def num_shards(self) -> int: ...

    def shard_blocks(self, index: int) -> Iterator[PairBlock]: ...

    def counts(self) -> tuple[int, int]:
        """(number of genuine pairs, number of impostor pairs)."""
        ...

    def max_quality(self) -> float: ...

    def fingerprint(self) -> str:
        """A stable hex digest of the pairs' content, recorded with results."""
        ...


def validate_arrays(
    cosine: np.ndarray, quality: np.ndarray, label: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check and convert score arrays; errors say what is wrong and where."""
    cos = np.asarray(cosine, dtype=np.float64).ravel()
    q = np.asarray(quality, dtype=np.float64).ravel()
    y = np.asarray(label).ravel()
    if not (len(cos) == len(q) == len(y)):
        raise ValueError(
            f"cosine, quality and label must have one length, got {len(cos)}, {len(q)}, {len(y)}"
        )
    for name, arr in (("cosine", cos), ("quality", q)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(
                f"{name} has {bad.size} non-finite value(s), first at index {int(bad[0])}"
            )
    if not np.isin(y, (0, 1)).all():
        bad = np.flatnonzero(~np.isin(y, (0, 1)))
        raise ValueError(
            f"label must be 1 (genuine) or 0 (impostor); {bad.size} value(s) are not, "
            f"first at index {int(bad[0])}: {y[bad[0]]!r}"
        )
    if (q < 0).any():
        raise ValueError(
            f"quality must be non-negative; first negative at index {int(np.flatnonzero(q < 0)[0])}"
        )
    return cos, q, y.astype(np.int8)


class ArrayPairSource:
    """Pairs given as in-memory arrays, cut into ``shards`` contiguous shards."""

    def __init__(
        self,
        cosine: np.ndarray,
        quality: np.ndarray,
        label: np.ndarray,
        shards: int = 1,
        block_size: int = 1 << 20,
    ) -> None:
        self.cosine, self.quality, self.label = validate_arrays(cosine, quality, label)
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        self._shards = min(shards, max(1, len(self.cosine)))
        self._block = block_size
        self._bounds = np.linspace(0, len(self.cosine), self._shards + 1).astype(np.int64)

    def num_shards(self) -> int:
        return self._shards

    def shard_blocks(self, index: int) -> Iterator[PairBlock]:
        lo, hi = int(self._bounds[index]), int(self._bounds[index + 1])
        for start in range(lo, hi, self._block):
            stop = min(hi, start + self._block)
            yield PairBlock(
                self.cosine[start:stop], self.quality[start:stop], self.label[start:stop]
            )

    def counts(self) -> tuple[int, int]:
        genuine = int(self.label.sum())
        return genuine, len(self.label) - genuine

    def max_quality(self) -> float:
        return float(self.quality.max()) if len(self.quality) else 0.0

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for arr in (self.cosine, self.quality, self.label):
            digest.update(np.ascontiguousarray(arr).tobytes())
        return digest.hexdigest()[:16]
