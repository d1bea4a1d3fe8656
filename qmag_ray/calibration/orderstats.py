"""Exact order statistics of impostor scores by histogram passes: calibration's numpy core.

The threshold search (``search``) needs, per candidate row (a weight, or an ``(alpha, beta)``
of the direct method) and per FMR, only the ``r``-th highest impostor score for a few ranks
``r``. They are found exactly, in memory that does not grow with the pairs, by passes over the
pairs whose state is a histogram per row (counts add up across shards, in any order):

- Pass 1 bins every row's scores with ``f(x) = clip(floor((x - lo) * scale), 0, B - 1)`` over
  the row's value range. ``f`` is monotone in ``x`` (each float operation rounds monotonically),
  so bin ``b`` holds exactly the floats in ``[E_b, E_(b+1))`` with ``E_b`` the smallest float of
  ``f`` at least ``b``; ``E_b`` is found afterwards by bisection over the floats
  (``first_bin_edges``). Bins 0 and ``B - 1`` run to -inf and +inf: no value is lost.
- The bins that hold a wanted rank become intervals ``[lo, hi)`` of floats, with the count of
  values above them. A later pass either collects the values of an interval (when few: the
  rank is then read off exactly) or splits it again in the order of the floats' bit patterns
  (``float_keys``: integers, so the split is exact), until every wanted rank is known. An
  interval of one float is resolved without a pass. Ties need no special case: an order
  statistic is a value of the multiset, whichever way ties are broken.

Memory per pass is bounded by ``hist_cells`` counts and ``collect_values`` values; the number
of passes grows slowly with the pairs (2 per order-statistics search from 1e6 to 1e9 exhaustive
pairs with the default budgets).
The caller supplies ``run_pass(plan) -> PassResult`` (in process, or Ray tasks merged), and
``scan_blocks`` is the per-shard step. Scores must be identical in every pass: a mismatch of
counts between passes is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from qmag_ray.calibration.search import weighted_logits
from qmag_ray.pairs.source import PairBlock, PairSource
from qmag_ray.scores import qmagface_score

#: Histogram counts held per pass (int64: 8 MB). Each pass result exists in a few copies at
#: once (the shard's, its serialised copy in the object store, the driver's sum), so this
#: bounds the job's memory; 4x larger budgets gave the same number of passes at 1e7 and 1e8 pairs
#: and ~100 MB more peak memory (tests/benchmarks/bench_scale.py).
HIST_CELLS = 1 << 20
#: Collected score values held per pass (float64: 32 MB at most, on the driver; each shard holds
#: its share in one buffer, ``Collector``). Sized so that the second pass collects every wanted
#: interval up to ~1e9 exhaustive pairs (2.5M values there), saving a third pass over the pairs
#: (tests/benchmarks/bench_scale.py).
COLLECT_VALUES = 1 << 22
#: Bins of a row in the first pass, at most / at least.
FIRST_BINS_MAX = 1 << 17
MIN_BITS, MAX_BITS = 4, 16
#: Passes after which ``order_statistics`` stops with an error. Each refinement pass narrows
#: every open interval of 64-bit float keys by at least ``MIN_BITS`` bits (or collects it), so
#: ``1 + 64 // MIN_BITS`` = 17 passes always suffice (and are reached with one-cell histograms);
#: more can only be a bug, which then fails at once instead of looping.
MAX_PASSES = 2 * (1 + 64 // MIN_BITS)
#: Pairs processed at a time inside a block (bounds the float64 temporaries).
CHUNK = 1 << 18
#: Cosines are assumed within this bound for the first pass's value range (a resolution hint
#: only: values outside still land in the edge bins and are refined).
COS_BOUND = 1.0

_MAX = np.int64(0x7FFFFFFFFFFFFFFF)
KEY_NEG_INF = -0x7FF0000000000000 - 1  # float_keys(-inf)
KEY_POS_INF = 0x7FF0000000000000  # float_keys(+inf)


def float_keys(x: np.ndarray) -> np.ndarray:
    """int64 keys in the order of the float64 values (-0.0 just below +0.0); no NaNs."""
    i = np.ascontiguousarray(x, dtype=np.float64).view(np.int64)
    return np.where(i < 0, i ^ _MAX, i)


def key_floats(k: np.ndarray) -> np.ndarray:
    """The float64 values of keys (the inverse of ``float_keys``)."""
    k = np.asarray(k, dtype=np.int64)
    return np.ascontiguousarray(np.where(k < 0, k ^ _MAX, k)).view(np.float64)


@dataclass(frozen=True)
class ScoreRows:
    """The candidate rows whose impostor scores are ranked.

    ``kind="logit"``: ``params`` are weights ``w``, the score is ``w * q + s`` (the sigmoid of
    spec section 3 is monotone and applied by the caller to the few values found).
    ``kind="qmagface"``: ``params`` are ``(alpha, beta)`` rows, the score is ``qmagface_score``.
    """

    kind: str
    params: np.ndarray
    max_quality: float

    def __post_init__(self) -> None:
        if self.kind not in ("logit", "qmagface"):
            raise ValueError(f"unknown score kind {self.kind!r}")

    def __len__(self) -> int:
        return len(self.params)

    def score(
        self, row: int, cosine: np.ndarray, quality: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The row's scores of float64 pairs (into the float64 buffer ``out`` when given)."""
        p = self.params[row]
        if self.kind == "logit":
            return weighted_logits(cosine, quality, float(p), out=out)
        return qmagface_score(cosine, quality, float(p[0]), float(p[1]), out=out)

    def cosine_floor(self, row: int, lowest: float) -> float:
        """A cosine below which a pair's score is surely below ``lowest`` (scores are at most
        ``s + max(0, w) * max_quality`` for weights, at most ``s`` for QMagFace scores), with a
        margin for the roundings."""
        if self.kind == "logit":
            lift = max(0.0, float(self.params[row])) * float(self.max_quality)
        else:
            lift = 0.0
        value = lowest - lift
        return value - 1e-9 * (abs(lowest) + abs(lift) + 1.0)

    def value_range(self, row: int) -> tuple[float, float]:
        """Where the scores lie for cosines in [-1, 1] and qualities in [0, max_quality]."""
        c, qmax = COS_BOUND, max(float(self.max_quality), 0.0)
        p = self.params[row]
        if self.kind == "logit":
            w = float(p)
            lo, hi = -c + min(0.0, w) * qmax, c + max(0.0, w) * qmax
        else:
            alpha, beta = float(p[0]), float(p[1])
            lo, hi = -c + min(0.0, -abs(beta) * c - alpha) * qmax, c
        pad = 1e-6 * (hi - lo) + 1e-12
        return lo - pad, hi + pad


def _first_bins(x: np.ndarray, lo: float, scale: float, bins: int) -> np.ndarray:
    """Pass-1 bin of each value, ``floor(clip((x - lo) * scale, 0, bins - 1))``: monotone in
    ``x``. Overwrites ``x`` (the caller's scratch buffer); the truncating integer conversion
    is ``floor`` on the clipped, non-negative values."""
    with np.errstate(over="ignore", invalid="ignore"):  # huge values go to the edge bins
        x -= lo
        x *= scale
    np.clip(x, 0, bins - 1, out=x)
    return x.astype(np.intp)


@dataclass
class PassPlan:
    """What one pass over the pairs computes; the same plan goes to every shard.

    ``first``: pass 1 (``bins`` bins per row over ``lo``/``scale``, and the genuine pairs and
    impostor count when ``genuine``). Otherwise intervals of float keys ``[klo, khi)``, sorted
    by (row, klo); interval ``j`` is histogrammed into ``(khi - klo) >> shift[j]`` bins of
    ``2 ** shift[j]`` keys each, starting at cell ``cell[j]``, or collected when ``shift[j]``
    is -1.
    """

    rows: ScoreRows
    first: bool
    genuine: bool = False
    bins: int = 0
    lo: np.ndarray = field(default_factory=lambda: np.empty(0))
    scale: np.ndarray = field(default_factory=lambda: np.empty(0))
    row: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    klo: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    khi: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    shift: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    cell: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    n_cells: int = 0
    cos_min: np.ndarray = field(default_factory=lambda: np.empty(0))
    count: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def n_collect(self) -> int:
        return int((self.shift < 0).sum())

    def collect_counts(self) -> np.ndarray:
        """How many values each collected interval holds over all shards (its slot's
        capacity); ``count`` holds every interval's, from the previous pass."""
        collect = np.asarray(self.shift) < 0
        count = np.asarray(self.count, np.int64)
        if len(count) != len(collect):
            if collect.any():
                raise ValueError("a pass plan with collected intervals needs their counts (count)")
            return np.empty(0, np.int64)
        return count[collect]


@dataclass
class PassResult:
    """What a shard (or a merge of shards) returns from one pass: counts add, values join."""

    hist: np.ndarray
    collected: list[np.ndarray]
    n_impostor: int = 0
    genuine_cosine: np.ndarray = field(default_factory=lambda: np.empty(0))
    genuine_quality: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def n_genuine(self) -> int:
        return len(self.genuine_cosine)


def empty_result(plan: PassPlan) -> PassResult:
    shape = (len(plan.rows), plan.bins) if plan.first else (plan.n_cells,)
    return PassResult(np.zeros(shape, np.int64), [np.empty(0) for _ in range(plan.n_collect())])


def merge_into(a: PassResult, b: PassResult) -> PassResult:
    """Add ``b`` into ``a`` (in place) and return ``a``."""
    if a.hist.shape != b.hist.shape or len(a.collected) != len(b.collected):
        raise ValueError("cannot merge results of different pass plans")
    a.hist += b.hist
    for s, extra in enumerate(b.collected):  # slot by slot: one slot's copy at a time
        a.collected[s] = np.concatenate([a.collected[s], extra])
    a.n_impostor += b.n_impostor
    if b.n_genuine:
        a.genuine_cosine = np.concatenate([a.genuine_cosine, b.genuine_cosine])
        a.genuine_quality = np.concatenate([a.genuine_quality, b.genuine_quality])
    return a


class Collector:
    """The values of a pass's collected intervals, in one flat buffer per shard.

    Slot ``s`` (the ``s``-th collected interval) owns ``collect_counts()[s]`` places, its
    count over all shards, so a shard never holds more than the pass's collect budget, however
    many blocks its values arrive in (a list of per-block pieces would hold one small array per
    block and slot: millions at 1e9 pairs). Values keep their arrival order within a slot.
    """

    def __init__(self, plan: PassPlan) -> None:
        self.capacity = plan.collect_counts()
        self.start = np.cumsum(self.capacity) - self.capacity
        self.fill = np.zeros(len(self.capacity), np.int64)
        self.values = np.empty(int(self.capacity.sum()), np.float64)

    def add(self, values: np.ndarray, slots: np.ndarray) -> None:
        """Append ``values[i]`` to slot ``slots[i]`` (float64 values, integer slots)."""
        if not len(values):
            return
        order = np.argsort(slots, kind="stable")
        slots = np.asarray(slots)[order]
        got = np.bincount(slots, minlength=len(self.capacity))
        if np.any(self.fill + got > self.capacity):
            raise RuntimeError(
                "scores changed between passes over the pairs: more values in an interval "
                "than it held (sources must score identically)"
            )
        first = np.searchsorted(slots, slots, side="left")  # each value's group start
        dest = self.start[slots] + self.fill[slots] + (np.arange(len(slots)) - first)
        self.values[dest] = np.asarray(values)[order]
        self.fill += got

    def finish(self) -> list[np.ndarray]:
        """Each slot's values (views of the one buffer)."""
        return [self.values[a : a + n] for a, n in zip(self.start, self.fill, strict=True)]


def shard_stream(source: PairSource, index: int) -> Iterator[PairBlock]:
    """The blocks of a shard for one pass: ``source.shard_stream`` where the source has one
    (blocks in reused buffers, each consumed before the next, as ``scan_blocks`` does), else
    ``source.shard_blocks``."""
    stream = getattr(source, "shard_stream", None)
    return stream(index) if stream is not None else source.shard_blocks(index)


def _chunks(blocks: Iterable[PairBlock]) -> Iterator[PairBlock]:
    """Blocks cut to at most ``CHUNK`` pairs, so float64 temporaries stay small."""
    for block in blocks:
        n = len(block.cosine)
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            yield PairBlock(block.cosine[a:b], block.quality[a:b], block.label[a:b])
        del block  # released before the next block is made


class _Scan:
    """Accumulates one pass over a stream of impostor scores (see ``scan_blocks``)."""

    def __init__(self, plan: PassPlan) -> None:
        self.plan = plan
        self.result = empty_result(plan)
        self.collector = Collector(plan)
        if not plan.first:
            # Per row: its intervals' positions, and the collect slots.
            self.slot = np.cumsum(plan.shift < 0) - 1
            bounds = np.searchsorted(plan.row, np.arange(len(plan.rows) + 1))
            self.row_span = [(int(bounds[r]), int(bounds[r + 1])) for r in range(len(plan.rows))]

    def add(self, row: int, x: np.ndarray) -> None:
        """Count (or collect) the row's scores ``x``; may overwrite ``x``."""
        plan = self.plan
        if plan.first:
            b = _first_bins(x, float(plan.lo[row]), float(plan.scale[row]), plan.bins)
            self.result.hist[row] += np.bincount(b, minlength=plan.bins)
            return
        a, z = self.row_span[row]
        if a == z:
            return
        klo, khi = plan.klo[a:z], plan.khi[a:z]
        x = x[x >= key_floats(klo[:1])[0]]  # cheap prefilter: most scores lie below the tail
        k = float_keys(x)
        k = k[(k >= klo[0]) & (k < khi[-1])]
        j = np.searchsorted(klo, k, side="right") - 1 if z - a > 1 else np.zeros(len(k), np.int64)
        inside = k < khi[j]
        k, j = k[inside], j[inside] + a
        shift = plan.shift[j]
        hist = shift >= 0
        if hist.any():
            cells = plan.cell[j[hist]] + ((k[hist] - plan.klo[j[hist]]) >> shift[hist])
            c0 = int(plan.cell[a:z][plan.shift[a:z] >= 0].min())
            c1 = int(cells.max()) + 1
            self.result.hist[c0:c1] += np.bincount(cells - c0, minlength=c1 - c0)
        if not hist.all():
            self.collector.add(key_floats(k[~hist]), self.slot[j[~hist]])

    def finish(self) -> PassResult:
        self.result.collected = self.collector.finish()
        return self.result


def _scan_chunk(
    scan: _Scan, block: PairBlock, gen_c: list[np.ndarray], gen_q: list[np.ndarray]
) -> int:
    """Add one chunk of pairs to ``scan`` (genuine pairs to ``gen_c``/``gen_q`` in pass 1);
    returns its number of impostor pairs."""
    plan = scan.plan
    imp = np.asarray(block.label) == 0
    cos = np.asarray(block.cosine, np.float64)
    q = np.asarray(block.quality, np.float64)
    if plan.genuine:
        gen_c.append(cos[~imp])
        gen_q.append(q[~imp])
    n_imp = int(imp.sum())
    if not n_imp:
        return 0
    cos_i, q_i = cos[imp], q[imp]
    if plan.first:
        buffer = np.empty(len(cos_i))
        for row in range(len(plan.rows)):
            scan.add(row, plan.rows.score(row, cos_i, q_i, out=buffer))
        return n_imp
    # Later passes: a row's scores at or above its lowest interval need cosines of at
    # least its cos_min; the pairs above the lowest of them, sorted by cosine, give each
    # row its candidates as one slice.
    keep = cos_i >= np.nanmin(plan.cos_min)
    cos_s, q_s = cos_i[keep], q_i[keep]
    if len(plan.rows) > 1:
        order = np.argsort(cos_s, kind="stable")
        cos_s, q_s = cos_s[order], q_s[order]
    for row in range(len(plan.rows)):
        if np.isnan(plan.cos_min[row]):
            continue  # nothing of this row is wanted
        start = 0
        if len(plan.rows) > 1:
            start = int(np.searchsorted(cos_s, plan.cos_min[row], side="left"))
        if start < len(cos_s):
            scan.add(row, plan.rows.score(row, cos_s[start:], q_s[start:]))
    return n_imp


def scan_blocks(blocks: Iterable[PairBlock], plan: PassPlan) -> PassResult:
    """One pass of ``plan`` over a stream of pair blocks (one shard, or all of them)."""
    scan = _Scan(plan)
    gen_c: list[np.ndarray] = []
    gen_q: list[np.ndarray] = []
    n_imp = 0
    for block in _chunks(blocks):
        n_imp += _scan_chunk(scan, block, gen_c, gen_q)
        del block  # a view of the source's block: released before the next is made
    result = scan.finish()
    result.n_impostor = n_imp
    if gen_c:
        result.genuine_cosine = np.concatenate(gen_c)
        result.genuine_quality = np.concatenate(gen_q)
    return result


def first_plan(rows: ScoreRows, *, genuine: bool, hist_cells: int = HIST_CELLS) -> PassPlan:
    """Pass 1: a power-of-two number of bins per row, as many as ``hist_cells`` allows."""
    per_row = max(1, hist_cells // max(len(rows), 1))
    bins = int(min(FIRST_BINS_MAX, max(1 << MIN_BITS, 1 << (per_row.bit_length() - 1))))
    ranges = np.array([rows.value_range(r) for r in range(len(rows))], np.float64).reshape(-1, 2)
    lo = ranges[:, 0]
    scale = bins / (ranges[:, 1] - ranges[:, 0])
    return PassPlan(rows, first=True, genuine=genuine, bins=bins, lo=lo, scale=scale)


def first_bin_edges(plan: PassPlan, row: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Keys of ``E_b`` (the smallest float whose pass-1 bin is at least ``b``) for rows/bins.

    Bisection over the floats' keys with the very function the pass used; ``b == 0`` gives the
    key of -inf and ``b == bins`` one past the key of +inf.
    """
    row, b = np.asarray(row, np.int64), np.asarray(b, np.int64)
    lo_k = np.full(len(b), KEY_NEG_INF, np.int64)
    hi_k = np.full(len(b), KEY_POS_INF, np.int64)
    for _ in range(66):
        open_ = lo_k < hi_k
        if not open_.any():
            break
        mid = (lo_k >> 1) + (hi_k >> 1) + (lo_k & hi_k & 1)  # no int64 overflow
        x = key_floats(mid)
        got = np.empty(len(x), np.intp)
        for r in np.unique(row):  # the very function of the pass, row by row
            at = row == r
            got[at] = _first_bins(x[at].copy(), float(plan.lo[r]), float(plan.scale[r]), plan.bins)
        ok = got >= b
        hi_k = np.where(open_ & ok, mid, hi_k)
        lo_k = np.where(open_ & ~ok, mid + 1, lo_k)
    edges = lo_k
    edges[b <= 0] = KEY_NEG_INF
    edges[b >= plan.bins] = KEY_POS_INF + 1
    return edges


@dataclass
class _Interval:
    """Float keys ``[klo, khi)`` of one row holding ``count`` values, ``above`` of them higher,
    and the wanted ranks (1 = highest) that fall inside (by their index in the rank list)."""

    row: int
    klo: int
    khi: int
    above: int
    count: int
    targets: list[int]


@dataclass(frozen=True)
class OrderStatistics:
    """Exact order statistics per row: ``values[row, i]`` is the ``ranks[i]``-th highest
    impostor score of that row; ``first`` is pass 1's result (genuine pairs, counts)."""

    values: np.ndarray
    first: PassResult
    passes: int


def order_statistics(
    run_pass: Callable[[PassPlan], PassResult],
    rows: ScoreRows,
    ranks: np.ndarray,
    n_impostor: int,
    *,
    genuine: bool = True,
    hist_cells: int = HIST_CELLS,
    collect_values: int = COLLECT_VALUES,
    max_passes: int = MAX_PASSES,
) -> OrderStatistics:
    """The ``ranks``-th highest impostor scores (1-based, each <= ``n_impostor``) of every row.

    Raises RuntimeError when the ranks are not resolved within ``max_passes`` passes.
    """
    ranks = np.asarray(ranks, np.int64)
    if len(ranks) and (ranks.min() < 1 or ranks.max() > n_impostor):
        raise ValueError(f"ranks must lie in 1..{n_impostor}, got {ranks.min()}..{ranks.max()}")
    values = np.full((len(rows), len(ranks)), np.nan)
    plan = first_plan(rows, genuine=genuine, hist_cells=hist_cells)
    first = run_pass(plan)
    if first.n_impostor != n_impostor:
        raise RuntimeError(
            f"a pass over the pairs saw {first.n_impostor} impostors, not {n_impostor}"
        )
    passes = 1
    if not len(ranks) or not len(rows):
        return OrderStatistics(values, first, passes)
    # Pass 1's bins holding each rank, then exact edges by bisection.
    counts = first.hist
    top = np.cumsum(counts[:, ::-1], axis=1)  # values in the top bins, per row
    pos = np.stack([np.searchsorted(top[r], ranks, side="left") for r in range(len(rows))])
    rr = np.repeat(np.arange(len(rows)), len(ranks))
    bb = plan.bins - 1 - pos.ravel()
    lo_keys = first_bin_edges(plan, rr, bb).reshape(pos.shape)
    hi_keys = first_bin_edges(plan, rr, bb + 1).reshape(pos.shape)
    intervals: dict[tuple[int, int], _Interval] = {}
    for r in range(len(rows)):
        for i in range(len(ranks)):
            b = plan.bins - 1 - int(pos[r, i])
            key = (r, b)
            if key not in intervals:
                above = int(top[r, pos[r, i]] - counts[r, b])
                intervals[key] = _Interval(
                    r, int(lo_keys[r, i]), int(hi_keys[r, i]), above, int(counts[r, b]), []
                )
            intervals[key].targets.append(i)
    todo = list(intervals.values())
    while todo:
        # Intervals of a single float are done; the smallest are collected within budget.
        open_: list[_Interval] = []
        for iv in todo:
            if iv.khi - iv.klo == 1:
                values[iv.row, iv.targets] = key_floats(np.array([iv.klo]))[0]
            else:
                open_.append(iv)
        if not open_:
            break
        if passes >= max_passes:
            raise RuntimeError(
                f"order statistics not resolved after {passes} passes over the pairs (the limit "
                f"is {max_passes}; each pass narrows every interval by {MIN_BITS}+ of 64 bits)"
            )
        open_.sort(key=lambda iv: (iv.row, iv.klo))
        by_count = sorted(range(len(open_)), key=lambda j: open_[j].count)
        collect = np.zeros(len(open_), bool)
        budget = collect_values
        for j in by_count:
            if open_[j].count > budget:
                break
            collect[j], budget = True, budget - open_[j].count
        n_hist = int((~collect).sum())
        bits = MAX_BITS
        if n_hist:
            bits = int(min(MAX_BITS, max(MIN_BITS, (hist_cells // n_hist).bit_length() - 1)))
        shift = np.full(len(open_), -1, np.int64)
        cell = np.zeros(len(open_), np.int64)
        n_cells = 0
        for j, iv in enumerate(open_):
            if collect[j]:
                continue
            width = iv.khi - iv.klo
            shift[j] = max(0, (width - 1).bit_length() - bits)
            cell[j] = n_cells
            n_cells += ((width - 1) >> int(shift[j])) + 1
        cos_min = np.full(len(rows), np.nan)  # NaN: nothing wanted from the row
        for iv in open_:  # sorted by (row, klo): a row's first interval is its lowest
            if np.isnan(cos_min[iv.row]):
                lowest = float(key_floats(np.array([iv.klo]))[0])
                cos_min[iv.row] = rows.cosine_floor(iv.row, lowest)
        plan = PassPlan(
            rows,
            first=False,
            cos_min=cos_min,
            row=np.array([iv.row for iv in open_], np.int64),
            klo=np.array([iv.klo for iv in open_], np.int64),
            khi=np.array([iv.khi for iv in open_], np.int64),
            shift=shift,
            cell=cell,
            n_cells=n_cells,
            count=np.array([iv.count for iv in open_], np.int64),
        )
        result = run_pass(plan)
        passes += 1
        todo = []
        slot = 0
        for j, iv in enumerate(open_):
            if collect[j]:
                got = np.sort(result.collected[slot])[::-1]
                slot += 1
                if len(got) != iv.count:
                    raise RuntimeError(
                        f"scores changed between passes over the pairs: {len(got)} values in "
                        f"an interval that held {iv.count} (sources must score identically)"
                    )
                for i in iv.targets:
                    values[iv.row, i] = got[ranks[i] - iv.above - 1]
                continue
            s = int(shift[j])
            n_bins = ((iv.khi - iv.klo - 1) >> s) + 1
            c = result.hist[cell[j] : cell[j] + n_bins]
            if int(c.sum()) != iv.count:
                raise RuntimeError(
                    f"scores changed between passes over the pairs: {int(c.sum())} values in "
                    f"an interval that held {iv.count} (sources must score identically)"
                )
            top_c = np.cumsum(c[::-1])
            children: dict[int, _Interval] = {}
            for i in iv.targets:
                p = int(np.searchsorted(top_c, ranks[i] - iv.above, side="left"))
                b = n_bins - 1 - p
                if b not in children:
                    klo = iv.klo + (b << s)
                    khi = min(iv.khi, iv.klo + ((b + 1) << s))
                    above = iv.above + int(top_c[p] - c[b])
                    children[b] = _Interval(iv.row, klo, khi, above, int(c[b]), [])
                children[b].targets.append(i)
            todo.extend(children.values())
    return OrderStatistics(values, first, passes)
