"""Calibration pairs generated from identity labels (spec: method.md section 5).

Per identity at most ``max_per_identity`` images are drawn (seeded), every genuine combination
among them is a pair, and for each genuine pair each of its two images gets
``impostors_per_side`` impostor partners drawn uniformly from the drawn images of all other
identities. Counts: ``G = sum_k C(min(n_k, m), 2)`` genuine and ``2 * impostors_per_side * G``
impostor pairs. Impostor partners are drawn with replacement, so an impostor pair may repeat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmag_ray.embeddings import EmbeddingTable
from qmag_ray.pairs.resolve import ResolvedPairs, ResolveReport

log = logging.getLogger(__name__)


def identity_codes(table: EmbeddingTable) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct identities, int64 code of each row); unlabelled rows are an error."""
    unknown = np.flatnonzero(np.asarray([x is None for x in table.identity], dtype=bool))
    if unknown.size:
        shown = ", ".join(repr(str(p)) for p in table.path[unknown[:10]])
        raise ValueError(
            f"{unknown.size} of {len(table)} embeddings have no identity label (e.g. {shown}); "
            "identity labels are needed here"
        )
    names, codes = np.unique(table.identity.astype(str), return_inverse=True)
    return names, codes.astype(np.int64)


def _draw_members(
    codes: np.ndarray, n_ident: int, max_per_identity: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sorted rows drawn per identity code (at most ``max_per_identity`` each)."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_ident + 1))
    members = []
    for k in range(n_ident):
        rows = order[bounds[k] : bounds[k + 1]]
        if len(rows) > max_per_identity:
            rows = np.sort(rng.choice(rows, size=max_per_identity, replace=False))
        members.append(rows)
    return members


@dataclass(frozen=True)
class DrawPlan:
    """What drawing the pairs needs, O(images) integers: the drawn images of each identity
    (``pool[start[k]:start[k] + sizes[k]]``, sorted), the identity code of every table row,
    and the generator state right after the member draws (where the impostor draws begin)."""

    codes: np.ndarray
    pool: np.ndarray
    start: np.ndarray
    sizes: np.ndarray
    impostors_per_side: int
    state: dict[str, Any]

    @property
    def n_identities(self) -> int:
        return len(self.sizes)

    def genuine_counts(self) -> np.ndarray:
        """Genuine pairs of each identity: ``C(size, 2)``."""
        return self.sizes * (self.sizes - 1) // 2


def draw_plan(
    table: EmbeddingTable, max_per_identity: int, impostors_per_side: int, seed: int
) -> DrawPlan:
    """Check the settings and the table, and draw the members of every identity (seeded).

    Raises:
        ValueError: unlabelled rows, bad settings, or no genuine pair / fewer than 2 identities.
    """
    if max_per_identity < 2:
        raise ValueError(f"max_per_identity must be at least 2, got {max_per_identity}")
    if impostors_per_side < 0:
        raise ValueError(f"impostors_per_side must be non-negative, got {impostors_per_side}")
    names, codes = identity_codes(table)
    bad = table.bad_rows()
    if bad.size:
        shown = ", ".join(repr(str(p)) for p in table.path[bad[:10]])
        raise ValueError(
            f"{bad.size} embeddings are NaN/inf, all zero or have a bad quality ({shown}); "
            "drop them first with EmbeddingTable.validate(policy='skip')"
        )
    if len(names) < 2:
        raise ValueError(f"need at least 2 identities to draw impostors, got {len(names)}")
    rng = np.random.default_rng(seed)
    members = _draw_members(codes, len(names), max_per_identity, rng)
    sizes = np.asarray([len(m) for m in members], dtype=np.int64)
    if not (sizes >= 2).any():
        raise ValueError("no identity has two or more images: no genuine pairs can be formed")
    # Pool of drawn images grouped by identity: identity k occupies pool[start[k]:start[k+1]].
    pool = np.concatenate(members)
    start = np.concatenate([[0], np.cumsum(sizes)])
    state = rng.bit_generator.state
    return DrawPlan(codes, pool, start, sizes, int(impostors_per_side), state)


def draw_identities(
    plan: DrawPlan, first: int, stop: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Genuine pairs (ga, gb) of identities ``first..stop-1`` and their impostors
    (anchor, partner), drawing the partners from ``rng`` (positioned where these identities'
    impostor draws begin: one draw per impostor, in order). Consecutive identity ranges drawn
    one after the other from one generator give the pairs of one call over their union: a
    numpy Generator's bounded integers drawn in pieces equal those of one call (tested)."""
    gen_a, gen_b = [], []
    for k in range(first, stop):
        rows = plan.pool[plan.start[k] : plan.start[k + 1]]
        if len(rows) >= 2:
            i, j = np.triu_indices(len(rows), k=1)
            gen_a.append(rows[i])
            gen_b.append(rows[j])
    if not gen_a:
        empty = np.empty(0, np.int64)
        return empty, empty, empty, empty
    ga, gb = np.concatenate(gen_a), np.concatenate(gen_b)
    sides = np.stack([ga, gb], axis=1).reshape(-1)  # a0, b0, a1, b1, ...
    anchor = np.repeat(sides, plan.impostors_per_side)
    k = plan.codes[anchor]
    sizes, start = plan.sizes, plan.start
    r = rng.integers(0, len(plan.pool) - sizes[k])  # a slot outside identity k's range
    r = r + np.where(r >= start[k], sizes[k], 0)
    partner = plan.pool[r]
    if (plan.codes[partner] == k).any():  # cannot happen; guards the index arithmetic above
        raise RuntimeError("internal error: an impostor partner shares the anchor's identity")
    return ga, gb, anchor, partner


def generate_pairs(
    table: EmbeddingTable,
    max_per_identity: int = 10,
    impostors_per_side: int = 5,
    seed: int = 0,
) -> ResolvedPairs:
    """Genuine pairs within identities and random cross-identity impostors, reproducibly.

    Output order: all genuine pairs (identity by identity, i < j), then the impostors of each
    genuine pair in that order (``impostors_per_side`` for its first image, then its second).
    ``GeneratedPairSource`` yields the same pairs shard by shard without this list.

    Raises:
        ValueError: unlabelled rows, bad settings, or no genuine pair / fewer than 2 identities.
    """
    plan = draw_plan(table, max_per_identity, impostors_per_side, seed)
    rng = np.random.default_rng(seed)
    rng.bit_generator.state = plan.state
    ga, gb, anchor, partner = draw_identities(plan, 0, plan.n_identities, rng)
    idx_a = np.concatenate([ga, anchor])
    idx_b = np.concatenate([gb, partner])
    label = np.concatenate([np.ones(len(ga), np.int8), np.zeros(len(anchor), np.int8)])
    n = len(label)
    log.info(
        "generated %d genuine and %d impostor pairs from %d identities (seed %d)",
        len(ga),
        len(anchor),
        plan.n_identities,
        seed,
    )
    report = ResolveReport(total=n, kept=n)
    return ResolvedPairs(idx_a, idx_b, label, np.arange(n, dtype=np.int64), report)


def identity_split(
    table: EmbeddingTable, fraction: float = 0.5, seed: int = 0, folds: int | None = None
) -> list[np.ndarray]:
    """Identity-disjoint sets of row indices (each sorted).

    With ``folds=None``: two sets, the first holding ``round(fraction * n_identities)``
    identities chosen at random. With ``folds=k``: k sets of near-equal identity counts.

    Raises:
        ValueError: unlabelled rows, or a split that would leave a set without identities.
    """
    names, codes = identity_codes(table)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(names))
    group = np.empty(len(names), dtype=np.int64)
    if folds is None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        cut = int(round(fraction * len(names)))
        if cut in (0, len(names)):
            raise ValueError(
                f"fraction {fraction} of {len(names)} identities leaves one side empty"
            )
        group[perm] = (np.arange(len(names)) >= cut).astype(np.int64)
        n_sets = 2
    else:
        if not 2 <= folds <= len(names):
            raise ValueError(f"folds must be between 2 and {len(names)} identities, got {folds}")
        group[perm] = np.arange(len(names)) % folds
        n_sets = folds
    row_group = group[codes]
    return [np.flatnonzero(row_group == s) for s in range(n_sets)]
