"""Benchmark: exact 1:N search on Ray against single-process exact faiss (not a test).

A synthetic gallery of G unit-direction embeddings (D dims, MagFace-like norms 10-35) and P
probes; qmag-ray's sharded search (``search_sharded``: float32 block products, per-shard top-k
by cosine AND by the QMagFace score, exact merge) on a local Ray cluster, then faiss
``IndexFlatIP`` (exact inner product on the unit vectors, cosine only, all threads of this
process) on the same data, one after the other in this run. Prints wall times, their ratio,
peak memory (summed PSS of this process tree: the driver, Ray's processes and workers), and
whether the cosine top-20 lists agree.

    nice -n 10 flock /tmp/qmag-bench.lock \
        .venv/bin/python -u tests/benchmarks/bench_identify.py --gallery 1000000 --probes 10000
    .venv/bin/python tests/benchmarks/bench_identify.py --gallery 200000 --probes 2000 --dim 512
    # generate once (untimed), then the timed run reads the arrays
    nice -n 10 .venv/bin/python tests/benchmarks/bench_identify.py --data /tmp/bench-ident \
        --gallery 1000000 --probes 10000 --generate-only
    flock /tmp/qmag-bench.lock .venv/bin/python -u tests/benchmarks/bench_identify.py \
        --data /tmp/bench-ident --gallery 1000000 --probes 10000 --first-probes 1000
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np


def load_memory_sampler():
    """``PeakMemory`` of bench_embed.py (loaded by path: tests/ is not a package)."""
    path = Path(__file__).resolve().parent / "bench_embed.py"
    spec = importlib.util.spec_from_file_location("bench_embed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PeakMemory


def synthetic(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """Raw float32 embeddings: random directions, norms uniform in [10, 35]."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        x *= (rng.uniform(10, 35, len(x)) / np.linalg.norm(x, axis=1)).astype(np.float32)[:, None]
        out[s : s + len(x)] = x
    return out


def generate(n_gallery: int, n_probes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    gallery = synthetic(n_gallery, dim, 0)
    probes = synthetic(n_probes, dim, 1)
    # probes near some gallery entries, so lists are not pure noise
    hit = np.random.default_rng(2).integers(0, n_gallery, n_probes)
    probes = (probes * 0.3 + gallery[hit]).astype(np.float32)
    return gallery, probes


def dataset(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The arrays of this size: generated, or read from ``--data`` (same seeds, same bits)."""
    if args.data is None:
        return generate(args.gallery, args.probes, args.dim)
    folder = Path(args.data) / f"g{args.gallery}-p{args.probes}-d{args.dim}"
    files = folder / "gallery.npy", folder / "probes.npy"
    if not all(f.exists() for f in files):
        folder.mkdir(parents=True, exist_ok=True)
        for f, x in zip(files, generate(args.gallery, args.probes, args.dim), strict=True):
            np.save(f.with_suffix(".tmp.npy"), x)
            f.with_suffix(".tmp.npy").rename(f)
    # read into memory (not a memory map): the timed search then starts from arrays in RAM
    return np.load(files[0]), np.load(files[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--probes", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--shards", type=int, default=0, help="Default: two per CPU (identify's).")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--skip-faiss", action="store_true")
    ap.add_argument(
        "--data",
        default=None,
        help="Folder for the generated arrays: written there when absent (untimed), read "
        "(memory-mapped) when present, so the timed run does not regenerate them.",
    )
    ap.add_argument(
        "--first-probes",
        type=int,
        default=0,
        help="Search only the first N of the --probes probes (a timed run within the lock's "
        "time on a loaded machine; the cost is linear in the probes).",
    )
    ap.add_argument(
        "--generate-only", action="store_true", help="Write the arrays to --data and stop."
    )
    args = ap.parse_args()
    args.shards = args.shards or 2 * args.cpus
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    peak_memory = load_memory_sampler()

    gallery, probes = dataset(args)
    if args.generate_only:
        return
    if args.first_probes:
        probes = probes[: args.first_probes]
    data_mb = (gallery.nbytes + probes.nbytes) / 2**20
    print(f"gallery {args.gallery:,} x {args.dim}, probes {len(probes):,} ({data_mb:,.0f} MiB)")
    print(f"load average before: {os.getloadavg()}")

    import ray

    from qmag_ray.search.distributed import search_sharded

    for attempt in range(5):  # a loaded machine can miss Ray's fixed 30 s start-up wait
        try:
            ray.init(
                num_cpus=args.cpus,
                include_dashboard=False,
                object_store_memory=int(gallery.nbytes * 1.5) + (256 << 20),
                logging_level="WARNING",
            )
            break
        except Exception as exc:  # noqa: BLE001 - retried, then raised
            print(f"ray.init attempt {attempt + 1} failed: {exc}", flush=True)
            ray.shutdown()
            if attempt == 4:
                raise
    with peak_memory(interval=1.0) as mem:
        t0 = time.perf_counter()
        ours = search_sharded(probes, gallery, args.k, 0.08, 0.12, shards=args.shards, use_ray=True)
        t_ours = time.perf_counter() - t0
    ray.shutdown()
    print(
        f"qmag-ray search_sharded ({args.shards} shards, {args.cpus} CPUs, cosine + QMagFace "
        f"top-{args.k}): {t_ours:.1f} s, peak PSS {mem.peak / 2**30:.2f} GiB, "
        f"load average after: {os.getloadavg()}"
    )
    if args.skip_faiss:
        return
    import faiss

    faiss.omp_set_num_threads(args.cpus)
    with peak_memory(interval=1.0) as mem:
        t0 = time.perf_counter()
        g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(args.dim)
        index.add(g.astype(np.float32))
        scores, ids = index.search(p.astype(np.float32), args.k)
        t_faiss = time.perf_counter() - t0
    print(
        f"faiss IndexFlatIP ({args.cpus} threads, cosine top-{args.k} only): {t_faiss:.1f} s, "
        f"peak PSS {mem.peak / 2**30:.2f} GiB"
    )
    same = (ids == ours["cosine"].index).mean()
    close = np.abs(scores - ours["cosine"].score).max()
    print(
        f"ratio qmag-ray / faiss: {t_ours / t_faiss:.2f} (qmag-ray also ranks by QMagFace); "
        f"cosine lists equal for {100 * same:.3f}% of entries, max score difference {close:.2e}"
    )
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
