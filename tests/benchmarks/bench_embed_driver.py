"""Benchmark: the embedding job's driver memory does not grow with the number of inputs.

Run as a script (pytest does not collect it)::

    RAY_USAGE_STATS_ENABLED=0 .venv/bin/python tests/benchmarks/bench_embed_driver.py \\
        --sizes 20000 200000

For each size N it builds a tree ``id<k>/<n>.bmp`` of N hard links to ten small BMP faces
(made from ``../shared/data/magface_toy``; hard links cost no disk), a checkpoint of the tiny
``tiny-bench`` backbone (``tiny_backbone.py``, registered in every Ray worker through
``worker_process_setup_hook``) and runs ``run_embed`` in a fresh driver process with its own
local Ray (2 CPUs). The figure is that driver's peak resident memory (``VmHWM``: torch, Ray's
core worker and everything the job holds), compared as the ratio of the largest to the
smallest size; the job's images/s and wall time are printed next to it with the load average.
Next to the peak each run reports the driver's resident memory before Ray started, once
connected, and at 25/50/75/100 % of the job (sampled every 2 s), so growth during the run shows,
and the pipeline's timings; ``--log`` prints each run's log (phases and progress lines, with
times) as it goes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOY = HERE.parents[2] / "shared" / "data" / "magface_toy"


def make_tree(root: Path, n: int, per_identity: int = 50) -> None:
    from PIL import Image

    sources = []
    root.parent.mkdir(parents=True, exist_ok=True)
    for i in range(10):
        target = root.parent / f"face{i}.bmp"
        if not target.exists():
            buf = io.BytesIO()
            Image.open(TOY / f"{i}.jpg").convert("RGB").save(buf, "BMP")
            target.write_bytes(buf.getvalue())
        sources.append(target)
    for k in range(n):
        folder = root / f"id{k // per_identity:06d}"
        if k % per_identity == 0:
            folder.mkdir(parents=True, exist_ok=True)
        os.link(sources[k % 10], folder / f"{k:07d}.bmp")


def _init(ray) -> None:  # noqa: ANN001
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        logging_level="WARNING",
        runtime_env={
            "env_vars": {"PYTHONPATH": str(HERE), "RAY_USAGE_STATS_ENABLED": "0"},
            "worker_process_setup_hook": "tiny_backbone.register",
        },
    )


def vm(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class RssTrace:
    """Samples this process's resident memory every ``interval`` seconds in a daemon thread,
    so that growth during the run shows (not only the peak)."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._began = time.perf_counter()

    def __enter__(self) -> RssTrace:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.perf_counter() - self._began, vm("VmRSS")))

    def quartiles(self) -> list[float]:
        """RSS (MiB) at 25, 50, 75 and 100 % of the sampled time."""
        if not self.samples:
            return []
        n = len(self.samples)
        return [round(self.samples[min(n - 1, n * q // 4)][1] / 1024, 1) for q in (1, 2, 3, 4)]


def child(args: argparse.Namespace) -> None:
    """One driver: run the job, print its figures as JSON."""
    import ray

    sys.path.insert(0, str(HERE))
    import tiny_backbone

    tiny_backbone.register()
    from qmag_ray.embedding import EmbedConfig, run_embed

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("qmag_ray").setLevel(logging.INFO)  # phases and progress, with times
    before_ray = vm("VmRSS")
    for attempt in range(3):  # a loaded machine can miss Ray's 30 s raylet start-up window
        try:
            _init(ray)
            break
        except Exception:
            if attempt == 2:
                raise
            ray.shutdown()
    cfg = EmbedConfig(
        images=args.images,
        model=args.model,
        arch="tiny-bench",
        output=args.output,
        overwrite=True,
        batch_size=args.batch_size,
        read_block_rows=args.batch_size,
        threads_per_actor=1,
        progress_seconds=30,
    )
    connected = vm("VmRSS")
    with RssTrace() as trace:
        summary = run_embed(cfg)
    hwm = vm("VmHWM")
    print(
        "RESULT "
        + json.dumps(
            {
                "inputs": summary.inputs,
                "embedded": summary.embedded,
                "shards": summary.shards,
                "driver_peak_mib": hwm / 1024,
                "rss_before_ray_mib": round(before_ray / 1024, 1),
                "rss_connected_mib": round(connected / 1024, 1),
                "rss_quartiles_mib": trace.quartiles(),
                "timings": {k: round(v, 1) for k, v in summary.timings.items()},
                "images_per_second": summary.images_per_second,
                "wall_seconds": summary.wall_seconds,
                "load": os.getloadavg()[0],
            }
        ),
        flush=True,
    )
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--log", action="store_true", help="print each run's log (phases and progress) as it goes"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(HERE))
    import tiny_backbone

    tiny_backbone.register()
    from qmag_ray.model import create_backbone, save_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-driver-"))
    try:
        model = work / "tiny.pth"
        save_checkpoint(create_backbone("tiny-bench").eval(), str(model), "tiny-bench")
        results = {}
        for n in args.sizes:
            tree = work / f"trees/images-{n}"
            began = time.perf_counter()
            make_tree(tree, n)
            print(f"tree of {n} images in {time.perf_counter() - began:.0f} s", flush=True)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--images",
                str(tree),
                "--model",
                str(model),
                "--output",
                str(work / f"out-{n}"),
                "--batch-size",
                str(args.batch_size),
            ]
            done = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=None if args.log else subprocess.PIPE,
                text=True,
                check=False,
            )
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(done.stdout[-3000:], (done.stderr or "")[-6000:])
                raise SystemExit(f"the run on {n} images failed")
            results[n] = json.loads(lines[-1][len("RESULT ") :])
            print(f"N={n}: {results[n]}", flush=True)
            shutil.rmtree(tree)
            shutil.rmtree(work / f"out-{n}", ignore_errors=True)
        small, large = min(results), max(results)
        ratio = results[large]["driver_peak_mib"] / results[small]["driver_peak_mib"]
        print(
            f"DRIVER PEAK at {small}: {results[small]['driver_peak_mib']:.0f} MiB, at {large}: "
            f"{results[large]['driver_peak_mib']:.0f} MiB, ratio {ratio:.3f} (target <= 1.2)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
