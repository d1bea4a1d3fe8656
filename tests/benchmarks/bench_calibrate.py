"""Benchmark: the project's calibration against the plain published algorithm (not a test).

Same synthetic pairs, same machine, one run each: the project's ``fit_qmagface`` (in-process
numpy path; optionally also the Ray path) and the oracle of ``tests/oracle.py`` (one
scikit-learn ROC curve per candidate weight, as the original code). Prints both wall times,
the speed-up and whether alpha and beta are identical.

    .venv/bin/python tests/benchmarks/bench_calibrate.py --pairs 2000000 [--ray-shards 4]

With ``--exhaustive N`` it instead calibrates on every pair of N synthetic embeddings (N=14143:
about 100,000,000 pairs, ~64,000 of them genuine) scored block-wise by ``ExhaustiveSource``,
in this process and, with ``--ray-shards``, on a local Ray cluster, and reports wall times and
peak memory (this process's peak RSS; on Ray also the peak RSS of every Ray worker process,
read from /proc, and of the driver). There is no oracle run at that size.

    .venv/bin/python tests/benchmarks/bench_calibrate.py --exhaustive 14143 [--ray-shards 4]
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


def ray_worker_peak_mb() -> dict[str, int]:
    """Peak RSS (VmHWM) of this machine's Ray worker processes, from /proc (Linux)."""
    peaks = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmd = (status.parent / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if cmd.startswith("ray::") and "VmHWM" in text:
            kb = int(text.split("VmHWM:")[1].split()[0])
            peaks[f"{cmd} (pid {status.parent.name})"] = kb // 1024
    return peaks


def exhaustive(args: argparse.Namespace) -> None:
    from qmag_ray.calibration.fit import calibrate
    from qmag_ray.pairs.exhaustive import ExhaustiveSource

    table = identity_table(args.exhaustive, args.dim, args.seed)
    source = ExhaustiveSource(table, shards=max(1, args.ray_shards))
    n_gen, n_imp = source.counts()
    result: dict[str, object] = {"embeddings": len(table), "genuine": n_gen, "impostor": n_imp}
    start = time.perf_counter()
    cal = calibrate(source)
    result["local_seconds"] = round(time.perf_counter() - start, 1)
    result["local_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    result["alpha"], result["beta"] = cal.alpha, cal.beta
    result["thresholds"] = cal.thresholds
    if args.ray_shards:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        from qmag_ray.calibration.distributed import fit_qmagface_ray
        from qmag_ray.runtime import connect_ray

        connect_ray(None)
        start = time.perf_counter()
        ray_cal = fit_qmagface_ray(source)
        result["ray_seconds"] = round(time.perf_counter() - start, 1)
        result["ray_identical"] = (ray_cal.alpha, ray_cal.beta) == (cal.alpha, cal.beta)
        workers = ray_worker_peak_mb()
        result["ray_worker_peak_rss_mb"] = workers
        result["ray_max_worker_peak_rss_mb"] = max(workers.values(), default=None)
        result["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        ray.shutdown()
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

        from qmag_ray.calibration.distributed import fit_qmagface_ray
        from qmag_ray.pairs.source import ArrayPairSource
        from qmag_ray.runtime import connect_ray

        connect_ray(None)
        source = ArrayPairSource(cos, q, y, shards=args.ray_shards)
        start = time.perf_counter()
        ray_cal = fit_qmagface_ray(source)
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
