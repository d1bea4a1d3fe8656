"""Benchmark: which fit? cosine, paper, raw and direct on held-out identities (not a test).

The issue 6 situation: synthetic MagFace-like embeddings (``tests/methods_data.py``: norm and
angular noise both driven by a per-image quality), identities split half and half (seeded),
pairs generated on each half as the calibrate workflow does (10 images per identity, 5
impostors per side of each genuine pair), alpha and beta fitted on the first half with the
paper's grid (50 FMRs in [1e-5, 1e-2], 20 weights), FNMR measured on the other half.
Prints a Markdown table, the fitted parameters and the wall time of each fit.

    .venv/bin/python tests/benchmarks/which_fit.py                      # 800 x 8, 512-d
    .venv/bin/python tests/benchmarks/which_fit.py --ray-shards 4       # also on local Ray

With ``--ray-shards`` every method is fitted again on a local Ray cluster (``num_cpus`` = this
machine's) and the script reports whether alpha and beta are identical to the in-process fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for methods_data

from methods_data import quality_faces  # noqa: E402

from qmag_ray import fit_qmagface, metrics  # noqa: E402
from qmag_ray.calibration.fit import METHODS  # noqa: E402
from qmag_ray.calibration.result import CalibrationGrid  # noqa: E402
from qmag_ray.pairs.generate import generate_pairs, identity_split  # noqa: E402
from qmag_ray.pairs.listed import score_pairs  # noqa: E402
from qmag_ray.pairs.source import ArrayPairSource  # noqa: E402
from qmag_ray.scores import qmagface_score  # noqa: E402

REPORT = (1e-2, 1e-3, 1e-4)
LABELS = {
    "cosine": "cosine (no quality)",
    "paper": "paper: published fit",
    "raw": "raw: same search, line fitted against raw-score thresholds",
    "direct": "direct: alpha, beta for the FNMR objective (41 x 41 grid + refinement)",
}


def sides(args: argparse.Namespace) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    table = quality_faces(
        args.identities,
        args.images,
        args.dim,
        args.seed,
        norm_lo=args.norm_lo,
        norm_hi=args.norm_hi,
        noise_lo=args.noise_lo,
        noise_hi=args.noise_hi,
    )
    out = []
    for rows in identity_split(table, 0.5, args.seed):
        part = table.take(rows)
        out.append(score_pairs(part, generate_pairs(part, 10, 5, args.seed)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=800)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norm-lo", type=float, default=8.0)
    parser.add_argument("--norm-hi", type=float, default=45.0)
    parser.add_argument("--noise-lo", type=float, default=0.5)
    parser.add_argument("--noise-hi", type=float, default=2.2)
    parser.add_argument("--fmr-min", type=float, default=1e-5)
    parser.add_argument("--ray-shards", type=int, default=0)
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args()

    t0 = time.perf_counter()
    (fc, fq, fy), (hc, hq, hy) = sides(args)
    print(
        f"{args.identities} identities x {args.images} images, {args.dim}-d; fit side "
        f"{int(fy.sum())} genuine / {int((fy == 0).sum())} impostor pairs, held-out side "
        f"{int(hy.sum())} / {int((hy == 0).sum())} (built in {time.perf_counter() - t0:.1f} s)"
    )
    grid = CalibrationGrid(fmr_min=args.fmr_min)
    results = {"cosine": {"fnmr": metrics.fnmr_at_fmr(hc, hy, REPORT).tolist()}}
    results["cosine"]["eer"] = metrics.eer(hc, hy)
    for method in METHODS:
        start = time.perf_counter()
        cal = fit_qmagface(fc, fq, fy, grid=grid, method=method)
        seconds = time.perf_counter() - start
        scores = qmagface_score(hc, hq, cal.alpha, cal.beta)
        results[method] = {
            "alpha": cal.alpha,
            "beta": cal.beta,
            "seconds": seconds,
            "fnmr": metrics.fnmr_at_fmr(scores, hy, REPORT).tolist(),
            "eer": metrics.eer(scores, hy),
        }
    if args.ray_shards:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        from qmag_ray.calibration.distributed import RayExecutor
        from qmag_ray.calibration.fit import fit_pairs

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        for method in METHODS:
            source = ArrayPairSource(fc, fq, fy, shards=args.ray_shards)
            start = time.perf_counter()
            cal = fit_pairs(source, executor=RayExecutor(source), grid=grid, method=method)
            results[method]["ray_seconds"] = time.perf_counter() - start
            same = (cal.alpha, cal.beta) == (results[method]["alpha"], results[method]["beta"])
            results[method]["ray_identical"] = same
        ray.shutdown()

    def pct(x: float) -> str:
        return f"{100 * x:.3f}%"

    print()
    print("| fit | FNMR @ FMR 1e-2 | @ 1e-3 | @ 1e-4 | EER | alpha | beta |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        params = ("-", "-") if name == "cosine" else (f"{r['alpha']:.5f}", f"{r['beta']:.5f}")
        cells = " | ".join(pct(x) for x in r["fnmr"])
        print(f"| {LABELS[name]} | {cells} | {pct(r['eer'])} | {params[0]} | {params[1]} |")
    print()
    for method in METHODS:
        r = results[method]
        line = f"{method}: fit {r['seconds']:.1f} s in-process"
        if "ray_seconds" in r:
            line += f", {r['ray_seconds']:.1f} s on Ray ({args.ray_shards} shards), "
            line += "identical" if r["ray_identical"] else "DIFFERENT"
        print(line)
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
