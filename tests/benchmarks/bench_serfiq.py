"""Benchmark: the cost of SER-FIQ as a ratio to the plain embedding, on this machine.

Run as a script (pytest does not collect it)::

    RAY_USAGE_STATS_ENABLED=0 .venv/bin/python tests/benchmarks/bench_serfiq.py \\
        --arch iresnet50 --arch iresnet100 --images 64 --batch-size 16 --passes 100

For each architecture (random weights: speed does not depend on them) one ``EmbedActor``
without and one with ``serfiq`` embed the same decoded batches, alternating batch by batch so
that both see the same machine load; the ratio of their wall-clock and of their CPU seconds
(``time.process_time``, less sensitive to other work on a shared machine) is printed. This
is the actor alone: the whole job adds the same reading, decoding and writing to both, so the
job's ratio is at most the actor's. ``--job`` also runs ``run_embed`` on a local Ray with
``--quality norm`` and ``--quality serfiq`` on the same images and prints that ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from serfiq_eval import timed_alternation

from qmag_ray.embedding.actor import EmbedActor
from qmag_ray.model import create_backbone, save_checkpoint
from qmag_ray.quality.serfiq import SerfiqSettings


def batches(n: int, size: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for start in range(0, n, size):
        k = min(size, n - start)
        out.append(
            {
                "index": np.arange(start, start + k, dtype=np.int64),
                "path": np.array([f"p/{i}.png" for i in range(start, start + k)], object),
                "image": rng.integers(0, 256, (k, 112, 112, 3), dtype=np.uint8),
                "error": np.array([""] * k, object),
                "resized_from": np.array([""] * k, object),
            }
        )
    return out


def actor_ratio(ckpt: str, arch: str, args: argparse.Namespace) -> dict[str, float]:
    settings = SerfiqSettings(args.passes, args.dropout, 0, args.dropout_type).to_dict()
    plain = EmbedActor(ckpt, arch, threads=args.threads)
    ser = EmbedActor(ckpt, arch, threads=args.threads, serfiq=settings)
    data = batches(args.images, args.batch_size)
    plain(data[0]), ser(data[0])  # warm-up
    wall, cpu = timed_alternation({"plain": plain, "serfiq": ser}, data)
    return {
        "plain_images_per_s": args.images / wall["plain"],
        "serfiq_images_per_s": args.images / wall["serfiq"],
        "wall_ratio": wall["serfiq"] / wall["plain"],
        "cpu_ratio": cpu["serfiq"] / cpu["plain"],
    }


def job_ratio(ckpt: str, arch: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    from qmag_ray.embedding import EmbedConfig, run_embed
    from qmag_ray.runtime import connect_ray

    root = tmp / "images"
    rng = np.random.default_rng(1)
    for i in range(args.images):
        (root / f"p{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(
            root / f"p{i % 4}" / f"{i}.png"
        )
    connect_ray(None)
    rates = {}
    for quality in ("norm", "serfiq", "norm", "serfiq"):
        cfg = EmbedConfig(
            images=str(root),
            model=ckpt,
            arch=arch,
            output=str(tmp / f"out-{quality}"),
            batch_size=args.batch_size,
            threads_per_actor=args.threads,
            quality=quality,
            serfiq_passes=args.passes,
            serfiq_dropout=args.dropout,
            overwrite=True,
            serfiq_dropout_type=args.dropout_type,
        )
        rates.setdefault(quality, []).append(run_embed(cfg).images_per_second)
    norm, ser = np.mean(rates["norm"]), np.mean(rates["serfiq"])
    return {"job_norm_images_per_s": norm, "job_serfiq_images_per_s": ser, "job_ratio": norm / ser}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", default=None)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--dropout-type", default="element")
    parser.add_argument("--job", action="store_true", help="also time the whole embed job")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for arch in args.arch or ["iresnet50", "iresnet100"]:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = str(Path(tmp) / "m.pth")
            torch.manual_seed(0)
            save_checkpoint(create_backbone(arch).eval(), ckpt, arch)
            result = {
                "arch": arch,
                "load_average": os.getloadavg()[0],
                **actor_ratio(ckpt, arch, args),
            }
            if args.job:
                result.update(job_ratio(ckpt, arch, args, Path(tmp)))
            result["load_average_after"] = os.getloadavg()[0]
            print(
                " ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in result.items()
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
