"""Benchmark: an IJB-C-sized template evaluation (15.6M template pairs) on Ray (not a test).

Writes a synthetic IJB-C-like set (default: 3,531 subjects, 23,124 templates of several media
of several frames, the IJB-C counts; all genuine template pairs plus impostor pairs up to
15,658,489 in all) as the real files (``embeddings/``, ``ijbc_face_tid_mid.txt``,
``ijbc_template_pair_label.txt``), then runs ``qmag-ray evaluate --protocol ijbc`` on it as a
library call on a local Ray cluster, and prints the wall time of each stage and the peak
memory (summed PSS of this process tree: the driver and every Ray process).

    .venv/bin/python tests/benchmarks/bench_templates.py --pairs 15658489
    # untimed generation, then the timed evaluation alone:
    .venv/bin/python tests/benchmarks/bench_templates.py --workdir /tmp/ijb --generate-only
    nice -n 10 flock /tmp/qmag-bench.lock \
        .venv/bin/python -u tests/benchmarks/bench_templates.py --workdir /tmp/ijb --reuse
    .venv/bin/python tests/benchmarks/bench_templates.py --pairs 1000000 --workdir /tmp/ijb
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path


def load_memory_sampler():
    path = Path(__file__).resolve().parent / "bench_embed.py"
    spec = importlib.util.spec_from_file_location("bench_embed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PeakMemory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=15_658_489)
    ap.add_argument("--subjects", type=int, default=3_531)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse", action="store_true", help="Reuse the files already in --workdir.")
    ap.add_argument(
        "--generate-only", action="store_true", help="Write the data set and stop (untimed)."
    )
    ap.add_argument("--bootstrap", type=int, default=1000, help="evaluate's --bootstrap.")
    ap.add_argument("--no-score-files", action="store_true", help="evaluate --no-score-files.")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    peak_memory = load_memory_sampler()

    from qmag_ray.synth.protocols import EmbeddingModel, ijb_like, write_ijb_like

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ijb-"))
    if args.reuse and (work / "ijbc_template_pair_label.txt").exists():
        files = {
            "embeddings": str(work / "embeddings"),
            "templates": str(work / "ijbc_face_tid_mid.txt"),
            "pairs": str(work / "ijbc_template_pair_label.txt"),
        }
        evaluate(args, files, work, peak_memory)
        return
    t0 = time.perf_counter()
    # IJB-C: 3,531 subjects, 23,124 templates (about 6.5 per subject)
    # the same draws as below (the model's dim changes how many numbers come before the
    # template counts), so the genuine count is the data set's and the total is --pairs
    probe = ijb_like(
        args.subjects, (5, 8), (1, 3), (1, 4), 0, seed=0, model=EmbeddingModel(dim=args.dim)
    )
    genuine = int(probe.pairs["label"].sum())
    impostors = max(0, args.pairs - genuine)
    data = ijb_like(
        args.subjects,
        (5, 8),
        (1, 3),
        (1, 4),
        impostors,
        seed=0,
        model=EmbeddingModel(dim=args.dim),
    )
    files = write_ijb_like(data, str(work))
    t_gen = time.perf_counter() - t0
    print(
        f"generated {len(data.embeddings):,} images, {len(data.subject_of_template):,} templates, "
        f"{len(data.pairs):,} template pairs ({int(data.pairs['label'].sum()):,} genuine) in "
        f"{t_gen:.0f} s under {work}"
    )
    del data, probe
    if args.generate_only:
        return
    evaluate(args, files, work, peak_memory)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def evaluate(args: argparse.Namespace, files: dict, work: Path, peak_memory: type) -> None:
    print(f"load average before: {os.getloadavg()}")

    import ray

    from qmag_ray.workflows.config import EvaluateConfig
    from qmag_ray.workflows.evaluate import run_evaluation

    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        logging_level="WARNING",
        object_store_memory=1 << 30,
    )
    cfg = EvaluateConfig(
        embeddings=files["embeddings"],
        pairs=files["pairs"],
        templates=files["templates"],
        protocol="ijbc",
        alpha=0.08,
        beta=0.12,
        output=str(work / "eval"),
        report={"bootstrap": args.bootstrap, "score_files": not args.no_score_files},
    )
    with peak_memory(interval=1.0) as mem:
        t0 = time.perf_counter()
        out = run_evaluation(cfg, use_ray=True)
        t_eval = time.perf_counter() - t0
    ray.shutdown()
    print(out.summary())
    print(
        f"evaluate --protocol ijbc: {t_eval:.0f} s for {out.pairs['resolve']['kept']:,} "
        f"template pairs on {args.cpus} CPUs, peak PSS {mem.peak / 2**30:.2f} GiB; "
        f"load average after: {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
