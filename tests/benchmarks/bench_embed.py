"""Benchmark: the whole embedding job against the bare backbone forward, on this machine.

Run as a script (pytest does not collect it)::

    RAY_USAGE_STATS_ENABLED=0 .venv/bin/python tests/benchmarks/bench_embed.py \\
        --arch iresnet18 --images 1000 --memory-images 300 --threads 2 --batch-size 32

It writes copies of the ten real faces of ``../shared/data/magface_toy`` into temporary trees
and a checkpoint with random weights (speed does not depend on the weights), then, in one
process and with the same torch threads and batch size:

1. times the bare forward pass on already-decoded batches (images/s), before and after the job,
   and takes the mean;
2. runs ``run_embed`` on N images (one actor) and takes images/s over its whole wall time
   (checkpoint check, listing, actor start-up, reading, decoding, inference, writing);
3. runs it on M and ``--scale`` x M images and compares the peak memory (proportional set size
   of this process and every Ray process it started, sampled every 2 s).

The machine should be otherwise idle: the load average is printed with each figure. On a
shared machine the wall-clock ratio is noisy; the CPU efficiency (CPU-seconds per image of the
bare forward over those of every process of the job) is the load-independent view of the
job's overhead, most telling with ``--threads 1``.
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


def cpu_by_pid(root: int) -> dict[int, float]:
    """User + system CPU seconds of ``root`` and each of its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


class PeakMemory:
    """Samples the PSS and CPU time of this process tree in a background thread.

    Reading PSS walks page tables and costs CPU, so sampling is sparse and the sampler's own
    CPU time is left out. CPU time is tracked per process, so that processes which exit
    during the job (task workers) still count up to their last sample.
    """

    def __init__(self, interval: float = 2.0) -> None:
        self.interval, self.peak = interval, 0
        self._base = cpu_by_pid(os.getpid())
        self._last = dict(self._base)
        self._own = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        total = sum(pss_bytes(p) for p in process_tree(os.getpid()))
        self.peak = max(self.peak, total)
        self._last.update(cpu_by_pid(os.getpid()))
        self._own = time.thread_time()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)
        self._sample()

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds the tree used while sampling, without the sampler's own."""
        used = sum(t - self._base.get(pid, 0.0) for pid, t in self._last.items())
        return used - self._own

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


def bare_forward(
    model: torch.nn.Module, batches: list[np.ndarray], threads: int
) -> tuple[float, float]:
    """Images/s and CPU-seconds per image of the forward pass alone on decoded uint8 batches
    (input conversion included)."""
    torch.set_num_threads(threads)
    n = sum(len(b) for b in batches)
    with torch.inference_mode():
        model(torch.from_numpy(to_input(batches[0])))  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            model(torch.from_numpy(to_input(batch)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return n / elapsed, cpu / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="iresnet18")
    parser.add_argument("--images", type=int, default=1000, help="N for the throughput ratio")
    parser.add_argument(
        "--memory-images", type=int, default=-1, help="M for the memory runs (-1: N, 0: skip)"
    )
    parser.add_argument("--scale", type=int, default=10, help="memory runs on M and scale x M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--read-cpus", type=float, default=1.0)
    parser.add_argument("--bare-images", type=int, default=256, help="images per bare timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("qmag_ray.embedding").setLevel(logging.INFO)
    m_images = args.images if args.memory_images < 0 else args.memory_images

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        torch.manual_seed(0)
        model = create_backbone(args.arch).eval()
        ckpt = str(work / "model.pth")
        save_checkpoint(model, ckpt, args.arch)
        decoded = np.stack(
            [decode_face((TOY / f"{k % 10}.jpg").read_bytes()) for k in range(args.bare_images)]
        )
        step = args.batch_size
        batches = [decoded[i : i + step] for i in range(0, args.bare_images, step)]

        def job(n: int) -> dict[str, float]:
            tree = work / f"images-{n}"
            if not tree.exists():
                make_tree(tree, n)
            cfg = EmbedConfig(
                images=str(tree),
                model=ckpt,
                arch=args.arch,
                output=str(work / f"out-{n}"),
                overwrite=True,
                actors=1,
                cpus_per_actor=1.0,
                threads_per_actor=args.threads,
                batch_size=args.batch_size,
                read_cpus=args.read_cpus,
            )
            with PeakMemory() as mem:
                summary = run_embed(cfg)
            cpu_per_image = mem.cpu_seconds / n
            assert summary.embedded == summary.inputs, summary.line()
            t = summary.timings
            steady = (summary.inputs - t["first_result_images"]) / max(
                t["pipeline_seconds"] - t["first_result_seconds"], 1e-9
            )
            print(
                f"job on {n} images: {summary.images_per_second:.2f} images/s over "
                f"{summary.wall_seconds:.1f} s wall (checks before Ray work "
                f"{summary.wall_seconds - t['pipeline_seconds']:.1f} s, first result after "
                f"{t['first_result_seconds']:.1f} s, then {steady:.2f} images/s); "
                f"{cpu_per_image:.3f} CPU-s/image (all processes); peak memory "
                f"{mem.peak / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            return {
                "rate": summary.images_per_second,
                "steady": steady,
                "peak": mem.peak,
                "cpu": cpu_per_image,
            }

        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        connect_ray(None, num_cpus=args.cpus)
        peaks: dict[int, int] = {}
        if args.images:
            bare_before, cpu_before = bare_forward(model, batches, args.threads)
            print(
                f"bare forward ({args.arch}, {args.threads} threads, batch {args.batch_size}): "
                f"{bare_before:.2f} images/s, {cpu_before:.3f} CPU-s/image; load average "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )
            result = job(args.images)
            peaks[args.images] = int(result["peak"])
            bare_after, cpu_after = bare_forward(model, batches, args.threads)
            print(
                f"bare forward again: {bare_after:.2f} images/s, {cpu_after:.3f} CPU-s/image; "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            bare = (bare_before + bare_after) / 2
            bare_cpu = (cpu_before + cpu_after) / 2
            print(
                f"RATIO job/bare ({args.arch}, N={args.images}, {args.threads} threads, batch "
                f"{args.batch_size}): {result['rate'] / bare:.3f} (bare {bare:.2f} images/s, "
                f"job {result['rate']:.2f} images/s); after the first result "
                f"{result['steady'] / bare:.3f}; CPU efficiency (bare/job CPU-s per image) "
                f"{bare_cpu / result['cpu']:.3f}"
            )
        if m_images:
            for n in (m_images, m_images * args.scale):
                if n not in peaks:
                    peaks[n] = int(job(n)["peak"])
            small, large = peaks[m_images], peaks[m_images * args.scale]
            print(
                f"MEMORY peak (PSS of driver + Ray processes) at {m_images} images: "
                f"{small / 2**20:.0f} MiB, at {m_images * args.scale}: {large / 2**20:.0f} MiB, "
                f"ratio {large / small:.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
