"""Mapping a pair list onto the rows of an embeddings table, with explicit, counted skips.

Problems (images not in the table, unusable embeddings, self-pairs, repeated pairs) are an
error by default, listing the first few with their source lines; each can instead be skipped
with ``on_<problem>="skip"``, and the ``ResolveReport`` counts what was skipped. Kept pairs stay
in file order and remember their position in the original list.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import asdict, dataclass, field
from enum import Enum

import numpy as np

from qmag_ray.embeddings import SHOW, EmbeddingTable
from qmag_ray.pairs.protocols import PairList

log = logging.getLogger(__name__)


class ResolveError(ValueError):
    """Pairs that cannot be mapped onto the embeddings; the message lists what and where."""


class Policy(str, Enum):
    """What to do with a problem pair: fail (default) or skip it and count it."""

    ERROR = "error"
    SKIP = "skip"


class Match(str, Enum):
    """How names are matched to table paths: the exact path or its trailing components."""

    EXACT = "exact"
    SUFFIX = "suffix"


@dataclass(frozen=True)
class ResolveReport:
    """What happened to each pair of the list; ``examples`` holds a few per problem."""

    total: int
    kept: int
    missing: int = 0
    missing_images: int = 0
    bad_embedding: int = 0
    self_pairs: int = 0
    duplicates: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return self.total - self.kept

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped": self.skipped}

    def summary(self) -> str:
        """One line for logs and command output."""
        parts = [f"{self.kept} of {self.total} pairs kept"]
        for name in ("missing", "bad_embedding", "self_pairs", "duplicates"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name)} skipped ({name.replace('_', ' ')})")
        return ", ".join(parts)


@dataclass(frozen=True, eq=False)
class ResolvedPairs:
    """Pairs as row indices into one embeddings table, in list order.

    Attributes:
        idx_a, idx_b: (n,) int64 rows of the table.
        label: (n,) int8, 1 genuine, 0 impostor.
        position: (n,) int64 index of each pair in the original list (fold bookkeeping).
        report: what was kept and skipped.
    """

    idx_a: np.ndarray
    idx_b: np.ndarray
    label: np.ndarray
    position: np.ndarray
    report: ResolveReport

    def __post_init__(self) -> None:
        for name in ("idx_a", "idx_b", "position"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        object.__setattr__(self, "label", np.asarray(self.label, dtype=np.int8))
        n = len(self.label)
        if not (len(self.idx_a) == len(self.idx_b) == len(self.position) == n):
            raise ValueError("idx_a, idx_b, label and position must have one length")

    def __len__(self) -> int:
        return len(self.label)

    def counts(self) -> tuple[int, int]:
        """(genuine, impostor) pair counts."""
        genuine = int(self.label.sum())
        return genuine, len(self) - genuine


def _suffix_lookup(paths: np.ndarray, depth: int) -> tuple[dict[str, int], set[str]]:
    """Map the last ``depth`` path components to row indices; also the ambiguous suffixes."""
    lookup: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, p in enumerate(paths):
        key = "/".join(str(p).split("/")[-depth:])
        if key in lookup:
            ambiguous.add(key)
        lookup[key] = i
    return lookup, ambiguous


def lookup_names(
    names: np.ndarray, table: EmbeddingTable, prefix: str = "", match: str | Match = "exact"
) -> np.ndarray:
    """Row index of each name (-1 where absent); ``prefix`` is joined on with '/'.

    With ``match="suffix"`` a name matches the path whose trailing components equal it (e.g.
    ``Abel_Pacheco/Abel_Pacheco_0001.jpg`` matches ``/data/lfw/Abel_Pacheco/...0001.jpg``);
    a name that matches several paths is an error.
    """
    match = Match(match)
    keys = [posixpath.join(prefix, str(n)) if prefix else str(n) for n in names]
    if match is Match.EXACT:
        return table.index_of(keys, missing=-1)
    out = np.full(len(keys), -1, dtype=np.int64)
    depths = sorted({k.count("/") + 1 for k in keys})
    for depth in depths:
        lookup, ambiguous = _suffix_lookup(table.path, depth)
        chosen = [k for k in keys if k.count("/") + 1 == depth]
        clash = sorted({k for k in chosen if k in ambiguous})
        if clash:
            raise ResolveError(
                f"{len(clash)} name(s) match several table paths by suffix: "
                f"{', '.join(repr(c) for c in clash[:SHOW])}; use a longer prefix or exact matching"
            )
        for pos, k in enumerate(keys):
            if k.count("/") + 1 == depth:
                out[pos] = lookup.get(k, -1)
    return out


def _examples(pairs: PairList, rows: np.ndarray) -> list[str]:
    return [f"{pairs.a[r]!s} / {pairs.b[r]!s} (line {int(pairs.line[r])})" for r in rows[:SHOW]]


def _conflicts(pairs: PairList, ok: np.ndarray, group: np.ndarray, first: np.ndarray) -> None:
    """One pair listed as genuine and as impostor: an error whatever the policies say.

    No choice of the two labels is right, so neither is skipped; the list must be fixed.
    """
    labels = pairs.label[ok].astype(np.int64)
    has_one = np.bincount(group, weights=labels == 1, minlength=len(first)) > 0
    has_zero = np.bincount(group, weights=labels == 0, minlength=len(first)) > 0
    bad_groups = np.flatnonzero(has_one & has_zero)
    if not bad_groups.size:
        return
    examples = []
    for g in bad_groups[:SHOW]:
        rows = ok[group == g]
        lines = ", ".join(str(int(pairs.line[r])) for r in rows[:4])
        examples.append(f"{pairs.a[rows[0]]!s} / {pairs.b[rows[0]]!s} (lines {lines})")
    more = " ..." if bad_groups.size > SHOW else ""
    raise ResolveError(
        f"{pairs.source or 'the pair list'}: {bad_groups.size} pair(s) are listed both as "
        f"genuine (1) and as impostor (0): {'; '.join(examples)}{more}; conflicting labels "
        "cannot be skipped: fix the list"
    )


def resolve_pairs(
    pairs: PairList,
    table: EmbeddingTable,
    *,
    prefix: str = "",
    match: str | Match = "exact",
    on_missing: str | Policy = "error",
    on_bad_embedding: str | Policy = "error",
    on_self: str | Policy = "error",
    on_duplicate: str | Policy = "error",
) -> ResolvedPairs:
    """Map ``pairs`` onto ``table.path``; problems fail or are skipped and counted.

    A pair falls in the first matching category: missing image, unusable (NaN/inf/zero)
    embedding, self-pair (both names are one row), duplicate (the same unordered pair again;
    the first occurrence is kept). A pair listed with both labels is always an error.

    Raises:
        ResolveError: listing (the first few of) every problem whose policy is ``error``.
    """
    policies = {
        "missing": Policy(on_missing),
        "bad_embedding": Policy(on_bad_embedding),
        "self_pairs": Policy(on_self),
        "duplicates": Policy(on_duplicate),
    }
    n = len(pairs)
    both = lookup_names(np.concatenate([pairs.a, pairs.b]), table, prefix, match)
    ia, ib = both[:n], both[n:]
    problem = np.zeros(n, dtype=np.int8)  # 0 ok, 1 missing, 2 bad, 3 self, 4 duplicate

    missing = (ia < 0) | (ib < 0)
    problem[missing] = 1
    bad_rows = np.zeros(len(table), dtype=bool)
    bad_rows[table.bad_rows()] = True
    bad = ~missing & (bad_rows[np.maximum(ia, 0)] | bad_rows[np.maximum(ib, 0)])
    problem[bad] = 2
    selfp = (problem == 0) & (ia == ib)
    problem[selfp] = 3
    ok = np.flatnonzero(problem == 0)
    lo, hi = np.minimum(ia[ok], ib[ok]), np.maximum(ia[ok], ib[ok])
    key = lo * np.int64(max(1, len(table))) + hi
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    _conflicts(pairs, ok, group.reshape(-1), first)
    dup = np.ones(len(ok), dtype=bool)
    dup[first] = False
    problem[ok[dup]] = 4

    names_missing = np.concatenate([pairs.a[ia < 0], pairs.b[ib < 0]]).astype(str)
    distinct_missing = np.unique(names_missing)
    counts = {
        "missing": int(missing.sum()),
        "bad_embedding": int(bad.sum()),
        "self_pairs": int(selfp.sum()),
        "duplicates": int(dup.sum()),
    }
    examples = {
        "missing": [
            f"{name!r} (line {int(line)})" for name, line in _first_missing(pairs, ia, ib, prefix)
        ],
        "bad_embedding": _examples(pairs, np.flatnonzero(problem == 2)),
        "self_pairs": _examples(pairs, np.flatnonzero(problem == 3)),
        "duplicates": _examples(pairs, np.flatnonzero(problem == 4)),
    }
    errors = [name for name, c in counts.items() if c and policies[name] is Policy.ERROR]
    if errors:
        raise ResolveError(
            _message(pairs, table, counts, examples, errors, len(distinct_missing), prefix, match)
        )
    keep = np.flatnonzero(problem == 0)
    report = ResolveReport(
        total=n,
        kept=len(keep),
        missing=counts["missing"],
        missing_images=len(distinct_missing),
        bad_embedding=counts["bad_embedding"],
        self_pairs=counts["self_pairs"],
        duplicates=counts["duplicates"],
        examples={k: v for k, v in examples.items() if v},
    )
    if report.skipped:
        log.warning("%s: %s", pairs.source or "pairs", report.summary())
    return ResolvedPairs(ia[keep], ib[keep], pairs.label[keep], keep, report)


def _first_missing(
    pairs: PairList, ia: np.ndarray, ib: np.ndarray, prefix: str
) -> list[tuple[str, int]]:
    """The first few missing paths (as looked up) in file order, with the first line naming each."""
    seen: dict[str, int] = {}
    for r in np.flatnonzero((ia < 0) | (ib < 0)):
        for name, idx in ((pairs.a[r], ia[r]), (pairs.b[r], ib[r])):
            key = posixpath.join(prefix, str(name)) if prefix else str(name)
            if idx < 0 and key not in seen:
                seen[key] = int(pairs.line[r])
        if len(seen) >= SHOW:
            break
    return list(seen.items())[:SHOW]


_HINTS = {
    "missing": ("name image(s) not in the embeddings table", "on_missing"),
    "bad_embedding": ("use an embedding with NaN/inf or all zeros", "on_bad_embedding"),
    "self_pairs": ("compare an image with itself", "on_self"),
    "duplicates": ("repeat an earlier pair", "on_duplicate"),
}


def _message(
    pairs: PairList,
    table: EmbeddingTable,
    counts: dict[str, int],
    examples: dict[str, list[str]],
    errors: list[str],
    n_missing_images: int,
    prefix: str,
    match: str | Match,
) -> str:
    lines = [
        f"cannot use {len(pairs)} pairs of {pairs.source or 'the pair list'} with the embeddings "
        f"table ({len(table)} rows, e.g. {str(table.path[0])!r}):"
        if len(table)
        else f"cannot use {len(pairs)} pairs: the embeddings table is empty:"
    ]
    for name in errors:
        text, option = _HINTS[name]
        extra = ""
        if name == "missing":
            extra = (
                f" ({n_missing_images} distinct image(s); matched {Match(match).value} with "
                f"prefix {prefix!r}, see prefix= and match='suffix')"
            )
        more = " ..." if counts[name] > SHOW else ""
        lines.append(
            f"  {counts[name]} pair(s) {text}{extra}: {'; '.join(examples[name])}{more}; "
            f"pass {option}='skip' to skip and count them"
        )
    return "\n".join(lines)
