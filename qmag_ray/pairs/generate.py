"""Calibration pairs generated from identity labels (spec: method.md section 5).

Per identity at most ``max_per_identity`` images are drawn (seeded), every genuine combination
among them is a pair, and for each genuine pair each of its two images gets
``impostors_per_side`` impostor partners drawn uniformly from the drawn images of all other
identities. Counts: ``G = sum_k C(min(n_k, m), 2)`` genuine and ``2 * impostors_per_side * G``
impostor pairs. Impostor partners are drawn with replacement, so an impostor pair may repeat.
"""

from __future__ import annotations

import logging

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


def generate_pairs(
    table: EmbeddingTable,
    max_per_identity: int = 10,
    impostors_per_side: int = 5,
    seed: int = 0,
) -> ResolvedPairs:
    """Genuine pairs within identities and random cross-identity impostors, reproducibly.

    Output order: all genuine pairs (identity by identity, i < j), then the impostors of each
    genuine pair in that order (``impostors_per_side`` for its first image, then its second).

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

    gen_a, gen_b = [], []
    for rows in members:
        if len(rows) >= 2:
            i, j = np.triu_indices(len(rows), k=1)
            gen_a.append(rows[i])
            gen_b.append(rows[j])
    if not gen_a:
        raise ValueError("no identity has two or more images: no genuine pairs can be formed")
    ga, gb = np.concatenate(gen_a), np.concatenate(gen_b)

    # Pool of drawn images grouped by identity: identity k occupies pool[start[k]:start[k+1]].
    pool = np.concatenate(members)
    sizes = np.asarray([len(m) for m in members], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(sizes)])
    sides = np.stack([ga, gb], axis=1).reshape(-1)  # a0, b0, a1, b1, ...
    anchor = np.repeat(sides, impostors_per_side)
    k = codes[anchor]
    r = rng.integers(0, len(pool) - sizes[k])  # a slot outside identity k's range
    r = r + np.where(r >= start[k], sizes[k], 0)
    partner = pool[r]
    if (codes[partner] == k).any():  # cannot happen; guards the index arithmetic above
        raise RuntimeError("internal error: an impostor partner shares the anchor's identity")

    idx_a = np.concatenate([ga, anchor])
    idx_b = np.concatenate([gb, partner])
    label = np.concatenate([np.ones(len(ga), np.int8), np.zeros(len(anchor), np.int8)])
    n = len(label)
    log.info(
        "generated %d genuine and %d impostor pairs from %d identities (seed %d)",
        len(ga),
        len(anchor),
        len(names),
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
