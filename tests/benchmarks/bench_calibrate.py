"""Benchmark: the project's calibration against the plain published algorithm (not a test).

Same synthetic pairs, same machine, one run each: the project's ``fit_qmagface`` (in-process
numpy path; optionally also the Ray path) and the oracle of ``tests/oracle.py`` (one
scikit-learn ROC curve per candidate weight, as the original code). Prints both wall times,
the speed-up and whether alpha and beta are identical.

    .venv/bin/python tests/benchmarks/bench_calibrate.py --pairs 2000000 [--ray-shards 4]

With ``--exhaustive N`` it instead calibrates on every pair of N synthetic embeddings (N=14143:
about 100,000,000 pairs, ~64,000 of them genuine) scored block-wise by ``ExhaustiveSource``,
in this process or, with ``--ray-shards``, on a local Ray cluster (run both to compare), and
reports wall time and peak memory: this process's peak RSS; on Ray the peak of the summed
PSS of the driver and all of this cluster's processes (sampled from /proc every 0.25 s; PSS
splits shared object-store pages among the processes mapping them, so none is counted twice)
and each worker's own peak RSS. There is no oracle run at that size.

    .venv/bin/python tests/benchmarks/bench_calibrate.py --exhaustive 14143
    .venv/bin/python tests/benchmarks/bench_calibrate.py --exhaustive 14143 --ray-shards 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import time
from pathlib import Path

import numpy as np

from qmag_ray import fit_qmagface


def load_oracle():
    """tests/oracle.py, loaded by path (the tests directory is not a package)."""
    path = Path(__file__).resolve().parents[1] / "oracle.py"
    spec = importlib.util.spec_from_file_location("qmag_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic(n: int, seed: int, genuine_share: float):
    """Cosine, pair quality and label; genuine and impostor scores depend on quality."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < genuine_share).astype(np.int8)
    q = rng.uniform(12.0, 35.0, n)
    z = (q - q.mean()) / q.std()
    cos = np.where(
        label == 1, rng.normal(0.55, 0.15, n) + 0.06 * z, rng.normal(0.0, 0.09, n) - 0.02 * z
    )
    return np.clip(cos, -1.0, 1.0), q, label


def identity_table(n: int, dim: int, seed: int, per_identity: int = 10):
    """N embeddings, ``per_identity`` per identity: a shared direction plus noise that grows
    as the norm (quality, 12 to 35) falls; genuine and impostor cosines overlap."""
    from qmag_ray.embeddings import EmbeddingTable

    rng = np.random.default_rng(seed)
    ids = np.arange(n) // per_identity
    centers = rng.normal(size=(ids.max() + 1, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    noise = rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    quality = rng.uniform(12.0, 35.0, n).astype(np.float32)
    # Low-quality faces are noisier (less of their identity shows), as MagFace's norms mean.
    strength = 2.8 - 1.8 * (quality - 12.0) / 23.0 + rng.uniform(-0.3, 0.3, n)
    vectors = centers[ids] + noise * strength[:, None].astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors *= quality[:, None]
    paths = np.asarray([f"img{i}.jpg" for i in range(n)], dtype=object)
    identity = np.asarray([f"id{i}" for i in ids], dtype=object)
    return EmbeddingTable(paths, identity, vectors, np.linalg.norm(vectors, axis=1))


def _cluster_pids() -> list[int]:
    """This driver, its Ray node's processes (raylet with the object store, GCS, ...) and the
    raylet's children (the workers), from /proc."""
    import ray._private.worker as ray_worker  # private: only to find our node's processes

    node = ray_worker.global_worker.node
    pids = {os.getpid()}
    for infos in node.all_processes.values():
        pids.update(info.process.pid for info in infos)
    raylet = node.all_processes["raylet"][0].process.pid
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == raylet:
                pids.add(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


def _pss_mb(pid: int) -> float:
    try:
        text = (Path("/proc") / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0.0
    return int(text.split("Pss:")[1].split()[0]) / 1024


def _role(pid: int) -> str:
    """``driver`` (this process), ``worker`` (a Ray worker: ``ray::`` and not an agent) or
    ``ray`` (the cluster's own processes: GCS, raylet with the object store, agents, ...)."""
    if pid == os.getpid():
        return "driver"
    try:
        cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return "ray"
    return "worker" if cmd.startswith("ray::") and not cmd.endswith("Agent") else "ray"


def _by_role(sizes: dict[int, float]) -> dict[str, int]:
    """Summed PSS (MB) per role of the processes in ``sizes`` (pid -> MB)."""
    parts: dict[str, float] = {}
    for pid, mb in sizes.items():
        role = _role(pid)
        parts[role] = parts.get(role, 0.0) + mb
    return {k: round(v) for k, v in sorted(parts.items())}


class PssSampler:
    """Samples the summed proportional set size (PSS: shared pages such as the object store
    split among the processes that map them, so nothing is counted twice) of the cluster's
    processes; ``peak_mb`` is the largest sum seen."""

    def __init__(self, interval: float = 0.25) -> None:
        import threading

        self.interval, self.peak_mb = interval, 0.0
        self.peak_parts: dict[str, int] = {}  # the peak's MB by role (``_by_role``)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids, last_scan = _cluster_pids(), time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last_scan > 2.0:  # pick up newly started workers
                pids, last_scan = _cluster_pids(), time.monotonic()
            sizes = {p: _pss_mb(p) for p in pids}
            total = sum(sizes.values())
            if total > self.peak_mb:
                self.peak_mb = total
                self.peak_parts = _by_role(sizes)
            self._stop.wait(self.interval)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ray_worker_peak_mb() -> dict[str, int]:
    """Peak RSS (VmHWM, MB) of each worker process of this driver's raylet."""
    import ray._private.worker as ray_worker

    raylet = ray_worker.global_worker.node.all_processes["raylet"][0].process.pid
    peaks = {}
    for pid in _cluster_pids():
        proc = Path("/proc") / str(pid)
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            status = (proc / "status").read_text()
            cmd = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet:
            peaks[f"{cmd} (pid {pid})"] = int(status.split("VmHWM:")[1].split()[0]) // 1024
    return peaks


def exhaustive(args: argparse.Namespace) -> None:
    """One executor per process run, so this process's peak RSS belongs to that run alone."""
    from qmag_ray.calibration.fit import fit_pairs
    from qmag_ray.pairs.exhaustive import ExhaustiveSource

    table = identity_table(args.exhaustive, args.dim, args.seed)
    source = ExhaustiveSource(table, shards=max(1, args.ray_shards))
    n_gen, n_imp = source.counts()
    result: dict[str, object] = {"embeddings": len(table), "genuine": n_gen, "impostor": n_imp}
    if args.ray_shards:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        from qmag_ray.calibration.distributed import RayExecutor
        from qmag_ray.calibration.fit import fit_pairs
        from qmag_ray.runtime import connect_ray

        connect_ray(None)
        with PssSampler() as sampler:
            idle_mb = sum(_pss_mb(p) for p in _cluster_pids())
            start = time.perf_counter()
            cal = fit_pairs(source, executor=RayExecutor(source))
            result["seconds"] = round(time.perf_counter() - start, 1)
        result["executor"] = f"ray, {args.ray_shards} shards, {os.cpu_count()} CPUs"
        result["cluster_pss_before_mb"] = round(idle_mb)
        result["cluster_peak_pss_mb"] = round(sampler.peak_mb)
        result["ray_worker_peak_rss_mb"] = ray_worker_peak_mb()
        result["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        ray.shutdown()
    else:
        start = time.perf_counter()
        cal = fit_pairs(source)
        result["executor"] = "in-process"
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    result["alpha"], result["beta"] = cal.alpha, cal.beta
    result["thresholds"] = cal.thresholds
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genuine-share", type=float, default=0.1)
    parser.add_argument(
        "--every-threshold",
        action="store_true",
        help="oracle ROC without scikit-learn's point dropping (default: the original's default)",
    )
    parser.add_argument("--ray-shards", type=int, default=0, help="also time the Ray path")
    parser.add_argument("--exhaustive", type=int, default=0, help="N embeddings, all pairs")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    if args.exhaustive:
        exhaustive(args)
        return

    cos, q, y = synthetic(args.pairs, args.seed, args.genuine_share)
    result: dict[str, object] = {
        "pairs": args.pairs,
        "genuine": int(y.sum()),
        "impostor": int((y == 0).sum()),
        "cpus": os.cpu_count(),
    }

    start = time.perf_counter()
    cal = fit_qmagface(cos, q, y)
    result["project_seconds"] = round(time.perf_counter() - start, 3)
    result["project_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    if args.ray_shards:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        from qmag_ray.calibration.distributed import RayExecutor
        from qmag_ray.calibration.fit import fit_pairs
        from qmag_ray.pairs.source import ArrayPairSource
        from qmag_ray.runtime import connect_ray

        connect_ray(None)
        source = ArrayPairSource(cos, q, y, shards=args.ray_shards)
        start = time.perf_counter()
        ray_cal = fit_pairs(source, executor=RayExecutor(source))
        result["ray_seconds"] = round(time.perf_counter() - start, 3)
        result["ray_identical"] = (ray_cal.alpha, ray_cal.beta) == (cal.alpha, cal.beta)
        ray.shutdown()

    oracle = load_oracle()
    start = time.perf_counter()
    want = oracle.oracle_fit(cos, q, y, drop_intermediate=not args.every_threshold)
    result["oracle_seconds"] = round(time.perf_counter() - start, 3)
    result["speedup"] = round(result["oracle_seconds"] / result["project_seconds"], 1)
    result["alpha"] = cal.alpha
    result["beta"] = cal.beta
    result["oracle_alpha"] = want["alpha"]
    result["oracle_beta"] = want["beta"]
    result["identical"] = (cal.alpha, cal.beta) == (want["alpha"], want["beta"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
