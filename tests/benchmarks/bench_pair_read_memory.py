"""Peak memory of reading and resolving an IJB-C-sized template pair file (not a test).

Reads WORKDIR's ``ijbc_template_pair_label.txt`` with ``read_template_pairs`` and maps it onto
the templates of ``ijbc_face_tid_mid.txt`` with ``resolve_template_pairs`` (placeholder 2-d
vectors: only the names matter), in this process, and prints the process's peak RSS after
each step with its wall time and a checksum of the resolved rows (the same for any correct
reader)::

    .venv/bin/python tests/benchmarks/bench_pair_read_memory.py /tmp/ijb

WORKDIR is what ``bench_templates.py --workdir /tmp/ijb --generate-only`` writes.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from qmag_ray.embeddings import EmbeddingTable
from qmag_ray.pairs.templates import read_template_pairs, resolve_template_pairs


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    root = sys.argv[1]
    ids = np.unique(np.loadtxt(f"{root}/ijbc_face_tid_mid.txt", dtype=str, usecols=1))
    n = len(ids)
    table = EmbeddingTable(
        ids.astype(object), None, np.ones((n, 2), np.float32), np.ones(n, np.float32)
    )
    before = peak_gib()
    t0 = time.perf_counter()
    pairs = read_template_pairs(f"{root}/ijbc_template_pair_label.txt")
    t1 = time.perf_counter()
    after_read = peak_gib()
    resolved = resolve_template_pairs(pairs, table)
    t2 = time.perf_counter()
    print(f"{len(pairs):,} pairs over {n:,} templates; {resolved.report.kept:,} kept")
    print(
        f"peak RSS {before:.2f} GiB before, {after_read:.2f} GiB after reading ({t1 - t0:.1f} s), "
        f"{peak_gib():.2f} GiB after resolving ({t2 - t1:.1f} s)"
    )
    print("checksum", int(resolved.idx_a.sum()), int(resolved.idx_b.sum()))


if __name__ == "__main__":
    main()
