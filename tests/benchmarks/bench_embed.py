"""Benchmark: the whole embedding job against the bare backbone forward, on this machine.

Run as a script (pytest does not collect it)::

    RAY_USAGE_STATS_ENABLED=0 .venv/bin/python tests/benchmarks/bench_embed.py \\
        --arch iresnet18 --images 600 --threads 2 --batch-size 32

It writes N copies of the ten real faces of ``../shared/data/magface_toy`` into a temporary
tree and a checkpoint with random weights (speed does not depend on the weights), then, in one
process and with the same torch threads and batch size:

1. times the bare forward pass on already-decoded batches (images/s), before and after the job;
2. runs ``run_embed`` on N images (one actor) and takes images/s over its whole wall time
   (start-up, checkpoint check, reading, decoding, inference, writing);
3. runs it again on ``--scale`` x N images;

and prints the throughput ratio job / bare forward and the peak memory (proportional set size
of this process and every Ray process it started, sampled every 0.2 s) at N and at scale x N.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from qmag_ray.embedding import EmbedConfig, run_embed
from qmag_ray.images import decode_face, to_input
from qmag_ray.model import create_backbone, save_checkpoint
from qmag_ray.runtime import connect_ray

TOY = Path(__file__).resolve().parents[3] / "shared" / "data" / "magface_toy"


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the total PSS of this process tree in a background thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(pss_bytes(p) for p in process_tree(os.getpid()))
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_tree(root: Path, n: int, per_identity: int = 50) -> None:
    faces = [(TOY / f"{i}.jpg").read_bytes() for i in range(10)]
    for k in range(n):
        folder = root / f"id{k // per_identity:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k:07d}.jpg").write_bytes(faces[k % 10])


def bare_forward(model: torch.nn.Module, batches: list[np.ndarray], threads: int) -> float:
    """Images/s of the forward pass alone on decoded uint8 batches (input conversion included)."""
    torch.set_num_threads(threads)
    with torch.inference_mode():
        model(torch.from_numpy(to_input(batches[0])))  # warm-up
        start = time.perf_counter()
        for batch in batches:
            model(torch.from_numpy(to_input(batch)))
        elapsed = time.perf_counter() - start
    return sum(len(b) for b in batches) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="iresnet18")
    parser.add_argument("--images", type=int, default=600, help="N")
    parser.add_argument("--scale", type=int, default=10, help="second run on scale x N images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--read-cpus", type=float, default=0.25)
    parser.add_argument("--bare-images", type=int, default=0, help="images for the bare timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("qmag_ray.embedding").setLevel(logging.INFO)

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        torch.manual_seed(0)
        model = create_backbone(args.arch).eval()
        ckpt = str(work / "model.pth")
        save_checkpoint(model, ckpt, args.arch)
        small, large = work / "small", work / "large"
        make_tree(small, args.images)
        if args.scale > 1:
            make_tree(large, args.images * args.scale)
        n_bare = args.bare_images or args.images
        decoded = np.stack(
            [decode_face((TOY / f"{k % 10}.jpg").read_bytes()) for k in range(n_bare)]
        )
        batches = [decoded[i : i + args.batch_size] for i in range(0, n_bare, args.batch_size)]

        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        connect_ray(None, num_cpus=args.cpus)
        bare_before = bare_forward(model, batches, args.threads)
        print(
            f"bare forward ({args.arch}, {args.threads} threads, batch {args.batch_size}): "
            f"{bare_before:.2f} images/s"
        )

        def job(tree: Path, name: str) -> tuple[float, int]:
            cfg = EmbedConfig(
                images=str(tree),
                model=ckpt,
                arch=args.arch,
                output=str(work / name),
                actors=1,
                cpus_per_actor=1.0,
                threads_per_actor=args.threads,
                batch_size=args.batch_size,
                read_cpus=args.read_cpus,
            )
            with PeakMemory() as mem:
                summary = run_embed(cfg)
            assert summary.embedded == summary.inputs, summary.line()
            t = summary.timings
            steady = (summary.inputs - args.batch_size) / max(
                t["pipeline_seconds"] - t["first_result_seconds"], 1e-9
            )
            print(
                f"  start-up: {summary.wall_seconds - t['pipeline_seconds']:.1f} s before Ray "
                f"work, {t['first_result_seconds']:.1f} s to the first batch; after it "
                f"{steady:.2f} images/s; load average {os.getloadavg()[0]:.1f}"
            )
            print(
                f"job on {summary.inputs} images: {summary.images_per_second:.2f} images/s "
                f"over {summary.wall_seconds:.1f} s wall, peak memory {mem.peak / 2**20:.0f} MiB"
            )
            return summary.images_per_second, mem.peak

        job_rate, peak_small = job(small, "out-small")
        bare_after = bare_forward(model, batches, args.threads)
        print(f"bare forward again: {bare_after:.2f} images/s")
        bare = (bare_before + bare_after) / 2
        print(
            f"RATIO job/bare ({args.arch}, N={args.images}): {job_rate / bare:.3f} "
            f"(bare {bare:.2f} images/s, job {job_rate:.2f} images/s)"
        )
        if args.scale > 1:
            large_rate, peak_large = job(large, "out-large")
            print(f"RATIO job/bare at {args.scale}N: {large_rate / bare:.3f}")
            print(
                f"MEMORY peak at N: {peak_small / 2**20:.0f} MiB, at {args.scale}N: "
                f"{peak_large / 2**20:.0f} MiB, ratio {peak_large / peak_small:.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
