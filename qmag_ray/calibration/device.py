"""Exhaustive scoring and the histogram passes in torch, on a GPU (or on the CPU with torch).

The same ``PassPlan`` in, the same ``PassResult`` out as ``orderstats.scan_blocks`` on an
``ExhaustiveSource``: tiles are scored on the device (float32 matrix products of the unit
vectors, as the numpy path), and every later step repeats the numpy path's float64 operations
one IEEE operation at a time (``w * q + s``; ``floor(clip((x - lo) * scale))`` bins; the
float keys; counts), so equal cosines give equal results bit for bit.

Condition for exact thresholds: the device's float32 matrix product must give the same bits
as numpy's. That holds for torch on the CPU here (tested), but not in general on a GPU
(another summation order; TF32 is switched off). ``DeviceScanner`` therefore checks the first
tile of its first shard against numpy and refuses to run when they differ (``verify=True``,
the default): the numpy path is then the exact one.

``DeviceExecutor`` runs the passes in this process; ``RayDeviceExecutor`` on Ray actors (one
GPU each where the cluster has them: ``actor_options={"num_gpus": 1}``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qmag_ray.calibration.orderstats import (
    CHUNK,
    Collector,
    PassPlan,
    PassResult,
    empty_result,
    merge_into,
)
from qmag_ray.pairs.exhaustive import ExhaustiveSource

_MAX = 0x7FFFFFFFFFFFFFFF


class DeviceScanner:
    """An ``ExhaustiveSource`` held on a torch device, scanning its shards for pass plans."""

    def __init__(self, source: ExhaustiveSource, device: str = "cpu", verify: bool = True):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        self.source = source
        self.unit = torch.from_numpy(source.unit).to(self.device)
        self.quality = torch.from_numpy(source.quality).to(self.device)
        self.codes = torch.from_numpy(source.codes).to(self.device)
        self.verified = not verify

    def _verify(self, bi: int, bj: int) -> None:
        r0, r1, c0, c1 = self.source.tile_parts(bi, bj)[0]
        want = self.source.unit[r0:r1] @ self.source.unit[c0:c1].T
        got = (self.unit[r0:r1] @ self.unit[c0:c1].T).cpu().numpy()
        if not np.array_equal(got, want):
            raise RuntimeError(
                f"the float32 matrix product on {self.device} differs from numpy's on tile "
                f"({bi}, {bj}) ({int((got != want).sum())} of {got.size} values): thresholds "
                "would not be bit-identical to the numpy path; calibrate with the numpy "
                "executor (or pass verify=False to accept device rounding)"
            )
        self.verified = True

    def blocks(self, index: int):
        """(cosine, quality, label) tensors of the shard's blocks, as ``score_tile`` cuts them."""
        torch = self.torch
        for bi, bj in self.source.shard_tiles(index):
            if not self.verified:
                self._verify(int(bi), int(bj))
            for r0, r1, c0, c1 in self.source.tile_parts(int(bi), int(bj)):
                cos = self.unit[r0:r1] @ self.unit[c0:c1].T
                qual = torch.minimum(self.quality[r0:r1, None], self.quality[None, c0:c1])
                same = self.codes[r0:r1, None] == self.codes[None, c0:c1]
                if r0 == c0:
                    mask = torch.ones(same.shape, dtype=torch.bool, device=self.device).triu(1)
                    yield cos[mask], qual[mask], same[mask]
                else:
                    yield cos.reshape(-1), qual.reshape(-1), same.reshape(-1)

    def scan(self, index: int, plan: PassPlan) -> PassResult:
        """``scan_blocks(source.shard_blocks(index), plan)``, on the device."""
        scan = _TorchScan(plan, self.device)
        gen_c, gen_q, n_imp = [], [], 0
        for cos32, q32, same in self.blocks(index):
            for a in range(0, len(cos32), CHUNK):
                cos = cos32[a : a + CHUNK].double()
                q = q32[a : a + CHUNK].double()
                gen = same[a : a + CHUNK]
                if plan.genuine:
                    gen_c.append(cos[gen].cpu().numpy())
                    gen_q.append(q[gen].cpu().numpy())
                imp = ~gen
                n_imp += int(imp.sum())
                scan.add(cos[imp], q[imp])
        result = scan.finish()
        result.n_impostor = n_imp
        if gen_c:
            result.genuine_cosine = np.concatenate(gen_c)
            result.genuine_quality = np.concatenate(gen_q)
        return result


class _TorchScan:
    """``orderstats._Scan`` in torch: the same operations on device tensors."""

    def __init__(self, plan: PassPlan, device: Any) -> None:
        import torch

        self.torch, self.plan, self.device = torch, plan, device
        shape = (len(plan.rows), plan.bins) if plan.first else (plan.n_cells,)
        self.hist = torch.zeros(shape, dtype=torch.int64, device=device)
        self.collector = Collector(plan)
        if not plan.first:
            t = lambda a: torch.as_tensor(np.asarray(a), device=device)  # noqa: E731
            self.klo, self.khi = t(plan.klo), t(plan.khi)
            self.shift, self.cell = t(plan.shift), t(plan.cell)
            self.slot = t(np.cumsum(plan.shift < 0) - 1)
            bounds = np.searchsorted(plan.row, np.arange(len(plan.rows) + 1))
            self.row_span = [(int(bounds[r]), int(bounds[r + 1])) for r in range(len(plan.rows))]
            self.floor = float(np.nanmin(plan.cos_min)) if len(plan.klo) else np.inf

    def score(self, row: int, cos: Any, q: Any) -> Any:
        """``ScoreRows.score`` in torch: the same IEEE operations in the same order."""
        rows = self.plan.rows
        p = rows.params[row]
        if rows.kind == "logit":
            return q * float(p) + cos
        x = cos * float(p[1]) - float(p[0])
        x = self.torch.where(x > 0, self.torch.zeros_like(x), x)  # numpy's minimum(0, x)
        return x * q + cos

    def add(self, cos: Any, q: Any) -> None:
        torch, plan = self.torch, self.plan
        if plan.first:
            for row in range(len(plan.rows)):
                x = self.score(row, cos, q)
                b = ((x - float(plan.lo[row])) * float(plan.scale[row])).clamp_(0, plan.bins - 1)
                self.hist[row] += torch.bincount(b.to(torch.int64), minlength=plan.bins)
            return
        keep = cos >= self.floor
        cs, qs = cos[keep], q[keep]
        if len(plan.rows) > 1:
            cs, order = torch.sort(cs, stable=True)
            qs = qs[order]
        for row in range(len(plan.rows)):
            if np.isnan(plan.cos_min[row]):
                continue
            start = 0
            if len(plan.rows) > 1:
                limit = torch.tensor([float(plan.cos_min[row])], dtype=cs.dtype, device=cs.device)
                start = int(torch.searchsorted(cs, limit, right=False))
            if start < len(cs):
                self._add_row(row, self.score(row, cs[start:], qs[start:]))

    def _add_row(self, row: int, x: Any) -> None:
        torch = self.torch
        a, z = self.row_span[row]
        if a == z:
            return
        klo, khi = self.klo[a:z], self.khi[a:z]
        i = x.view(torch.int64)
        k = torch.where(i < 0, i ^ _MAX, i)
        k = k[(k >= klo[0]) & (k < khi[-1])]
        j = torch.searchsorted(klo, k, right=True) - 1 if z - a > 1 else torch.zeros_like(k)
        inside = k < khi[j]
        k, j = k[inside], j[inside] + a
        shift = self.shift[j]
        hist = shift >= 0
        if bool(hist.any()):
            jh = j[hist]
            cells = self.cell[jh] + ((k[hist] - self.klo[jh]) >> shift[hist])
            c0, c1 = int(cells.min()), int(cells.max()) + 1
            self.hist[c0:c1] += torch.bincount(cells - c0, minlength=c1 - c0)
        if not bool(hist.all()):
            kc, slots = k[~hist], self.slot[j[~hist]]
            kc_np, slots_np = kc.cpu().numpy(), slots.cpu().numpy()
            values = np.where(kc_np < 0, kc_np ^ _MAX, kc_np).view(np.float64)
            self.collector.add(values, slots_np)

    def finish(self) -> PassResult:
        result = empty_result(self.plan)
        result.hist = self.hist.cpu().numpy()
        result.collected = self.collector.finish()
        return result


class DeviceExecutor:
    """Runs every pass with a ``DeviceScanner`` in this process, shard after shard."""

    name = "torch"

    def __init__(self, source: ExhaustiveSource, device: str = "cpu", verify: bool = True):
        self.source = source
        self.scanner = DeviceScanner(source, device, verify)

    def run_pass(self, plan: PassPlan) -> PassResult:
        total = empty_result(plan)
        for index in range(self.source.num_shards()):
            merge_into(total, self.scanner.scan(index, plan))
        return total


class RayDeviceExecutor:
    """Runs the passes on ``actors`` Ray actors holding the source on their device (one GPU
    each with ``actor_options={"num_gpus": 1}``); shards are dealt round-robin."""

    name = "ray-torch"

    def __init__(
        self,
        source: ExhaustiveSource,
        device: str = "cuda",
        actors: int = 1,
        actor_options: dict[str, Any] | None = None,
        verify: bool = True,
    ) -> None:
        import ray

        self.ray, self.source = ray, source
        actor = ray.remote(DeviceScanner).options(**(actor_options or {}))
        ref = ray.put(source)
        self.actors = [actor.remote(ref, device, verify) for _ in range(max(1, actors))]

    def run_pass(self, plan: PassPlan) -> PassResult:
        ray = self.ray
        plan_ref = ray.put(plan)
        pending = [
            self.actors[i % len(self.actors)].scan.remote(i, plan_ref)
            for i in range(self.source.num_shards())
        ]
        total = empty_result(plan)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            merge_into(total, ray.get(ready[0]))
        return total
