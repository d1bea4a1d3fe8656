"""Benchmark: exact calibration's time and peak memory against the number of pairs (not a test).

Every point calibrates (paper method, default grid) on ALL pairs of N synthetic 64-d
embeddings (10 per identity; ``bench_calibrate.identity_table``), scored block-wise by
``ExhaustiveSource``, in a fresh subprocess so that its peak memory is its own:

- ``--executor ray`` (default): a local Ray cluster (this machine's CPUs), ``--shards`` tasks
  per pass; memory is the peak of the summed PSS of the driver and every process of the
  cluster (raylet with the object store, GCS, workers, ...), sampled from /proc every 0.25 s;
  CPU is the summed user+system time of those processes.
- ``--executor local``: in this process; peak RSS and process CPU time.

With ``--tail-tree PATH`` (a checkout of the commit before the histogram passes, whose
calibration kept per-weight impostor tails, e.g. ``git worktree add /tmp/tail ea5090a``) the
same pairs are also calibrated there, in process, up to ``--tail-max`` pairs, and alpha, beta,
every optimal threshold and every operating threshold are compared for bit equality.

    .venv/bin/python tests/benchmarks/bench_scale.py --pairs 1e6 1e7 1e8 --tail-tree /tmp/tail
    .venv/bin/python tests/benchmarks/bench_scale.py --pairs 1e9
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def embeddings_for(pairs: float) -> int:
    """N with N (N - 1) / 2 closest to ``pairs``."""
    return int(round((1 + math.sqrt(1 + 8 * pairs)) / 2))


def _cpu_seconds(pid: int) -> float:
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return -1.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb() -> int:
    status = (Path("/proc") / "self" / "status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)``: return the heap's free pages to the OS (no-op elsewhere)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def one(args: argparse.Namespace) -> dict[str, object]:
    """One point, in this process (called in a subprocess by ``main``)."""
    sys.path.insert(0, str(HERE))
    from bench_calibrate import identity_table

    try:
        from qmag_ray.calibration.fit import fit_pairs
    except ImportError:  # the --tail-tree checkout (ea5090a) named it calibrate
        from qmag_ray.calibration.fit import calibrate as fit_pairs
    from qmag_ray.pairs.exhaustive import ExhaustiveSource

    table = identity_table(args.one, args.dim, args.seed)
    shards = args.shards if args.executor == "ray" else 1
    source = ExhaustiveSource(table, shards=shards)
    n_gen, n_imp = source.counts()
    out: dict[str, object] = {"embeddings": len(table), "genuine": n_gen, "impostor": n_imp}
    # Generating the synthetic table leaves ~50 MB of freed float64 temporaries in glibc's heap
    # at 1e9 pairs (a job reads its table from a file instead); hand them back to the OS so
    # that the driver's figure is the calibration's. Both sizes are recorded.
    out["driver_rss_mb_before_trim"] = _rss_mb()
    _malloc_trim()
    out["driver_rss_mb_after_trim"] = _rss_mb()
    if args.executor == "ray":
        import threading

        import ray
        from bench_calibrate import PssSampler, _cluster_pids

        from qmag_ray.calibration.distributed import RayExecutor
        from qmag_ray.runtime import connect_ray

        for attempt in range(5):  # a loaded machine can miss Ray's 30 s raylet start-up window
            try:
                connect_ray(None)
                break
            except Exception:
                if attempt == 4:
                    raise
                ray.shutdown()
        cpu: dict[int, float] = {}
        stop = threading.Event()

        def sample_cpu() -> None:
            pids, scanned = [], 0.0
            while not stop.is_set():
                if time.monotonic() - scanned > 5.0:  # listing /proc is costly on a busy host
                    pids, scanned = (
                        [p for p in _cluster_pids() if p != os.getpid()],
                        time.monotonic(),
                    )
                for pid in pids:
                    c = _cpu_seconds(pid)
                    if c >= 0:
                        cpu[pid] = c
                stop.wait(1.0)

        from bench_calibrate import _by_role, _pss_mb

        idle = {p: _pss_mb(p) for p in _cluster_pids()}
        out["idle_cluster_mb"] = round(sum(idle.values()))
        out["idle_by_role_mb"] = _by_role(idle)
        before = {pid: _cpu_seconds(pid) for pid in _cluster_pids()}
        thread = threading.Thread(target=sample_cpu, daemon=True)
        thread.start()
        with PssSampler() as sampler:
            start, driver0 = time.perf_counter(), time.thread_time()
            cal = fit_pairs(source, executor=RayExecutor(source))
            out["seconds"] = round(time.perf_counter() - start, 1)
            driver = time.thread_time() - driver0
        stop.set()
        thread.join()
        # CPU: the cluster's processes, plus the driver's main thread (not the samplers').
        cluster = sum(c - max(before.get(p, 0.0), 0.0) for p, c in cpu.items())
        out["cpu_seconds"] = round(cluster + driver, 1)
        out["driver_cpu_seconds"] = round(driver, 1)
        out["peak_mb"] = round(sampler.peak_mb)
        out["peak_by_role_mb"] = sampler.peak_parts
        out["memory"] = "peak summed PSS, driver + every Ray process"
        ray.shutdown()
    else:
        start, cpu0 = time.perf_counter(), time.process_time()
        cal = fit_pairs(source)
        out["seconds"] = round(time.perf_counter() - start, 1)
        out["cpu_seconds"] = round(time.process_time() - cpu0, 1)
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        out["memory"] = "peak RSS of the process"
    out["executor"] = args.executor
    out["passes"] = cal.extra.get("passes")
    out["alpha"], out["beta"] = cal.alpha, cal.beta
    out["optimal_thresholds"] = cal.optimal_thresholds
    out["thresholds"] = cal.thresholds
    return out


def run_point(pairs: float, args: argparse.Namespace, tree: Path | None = None) -> dict:
    """Run ``one`` in a subprocess; with ``tree``, the package from that checkout, in process."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(embeddings_for(pairs))]
    cmd += ["--dim", str(args.dim), "--seed", str(args.seed), "--shards", str(args.shards)]
    cmd += ["--executor", "local" if tree else args.executor]
    if tree:
        env["PYTHONPATH"] = str(tree)  # ahead of the editable install of this checkout
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"point {pairs:g} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--executor", choices=("ray", "local"), default="ray")
    parser.add_argument("--tail-tree", type=Path, default=None)
    parser.add_argument("--tail-max", type=float, default=1e8)
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    rows = []
    for pairs in args.pairs:
        load = os.getloadavg()[0]
        got = run_point(pairs, args)
        got["load_before"] = round(load, 1)
        if args.tail_tree and pairs <= args.tail_max:
            tail = run_point(pairs, args, args.tail_tree)
            keys = ("alpha", "beta", "optimal_thresholds", "thresholds")
            got["tail_identical"] = all(got[k] == tail[k] for k in keys)
            got["tail_seconds"], got["tail_peak_mb"] = tail["seconds"], tail["peak_mb"]
        rows.append(got)
        print(json.dumps(got), flush=True)
    print("\n| impostor pairs | seconds | CPU s | CPU ns/pair | peak MB (idle) | passes | = tail |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ns = 1e9 * r["cpu_seconds"] / r["impostor"]
        tail = {True: "yes", False: "NO"}.get(r.get("tail_identical"), "-")
        print(
            f"| {r['impostor']:.3g} | {r['seconds']} | {r['cpu_seconds']} | {ns:.0f} | "
            f"{r['peak_mb']} ({r.get('idle_cluster_mb', '-')}) | {r['passes']} | {tail} |"
        )


if __name__ == "__main__":
    main()
