"""The evaluation loop the SER-FIQ benchmark scripts share (not a test, not collected).

``serfiq_demo.py``, ``serfiq_sweep.py`` and ``bench_serfiq.py`` import it from their own folder
(run as ``.venv/bin/python tests/benchmarks/<script>.py``, that folder is on ``sys.path``):

- :func:`decode_set`: a ``qmag-ray synth`` set (images plus ``manifest.parquet`` with the
  ``degradation`` column) decoded as the embed job's decode tasks do;
- :func:`in_batches`: one function over a set in fixed-size slices, outputs concatenated (the
  trunk once, the head's passes, the embed actor), so that each script's loop is the same;
- :func:`embed_set`: the embed actor (with its ``serfiq`` column) over a decoded set, written
  as one embeddings part that ``load_embeddings``/``run_evaluation`` read;
- :func:`degradation_spearman`: Spearman of each quality with the synthetic degradation, the
  figure README reports;
- :func:`evaluate_qualities`: generated pairs and ``run_evaluation`` with the EDC of several
  qualities, the bootstrap intervals, the score files and the ``pose_band`` report;
- :func:`timed_alternation`: callables timed batch by batch in turn (wall and CPU seconds), so
  that the cost comparison sees the same load for each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import spearmanr

from qmag_ray.embedding.inputs import read_and_decode
from qmag_ray.embedding.output import embedding_batch

BATCH = 64


def decode_set(root: str) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The manifest of a synthetic set and all its images decoded (112x112 BGR)."""
    manifest = pd.read_parquet(f"{root}/manifest.parquet")
    batch = read_and_decode(
        {
            "shard": np.zeros(len(manifest), np.int64),
            "pos": np.arange(len(manifest)),
            "path": manifest["path"].to_numpy(object),
            "identity": manifest["identity"].to_numpy(object),
        },
        root=root,
        resize=False,
    )
    failed = [p for p, e in zip(batch["path"], batch["error"], strict=True) if e != ""]
    if failed:
        raise SystemExit(f"{len(failed)} images of {root} failed to decode, e.g. {failed[0]}")
    return manifest, batch


def in_batches(fn: Callable[..., Any], *columns: Sequence, size: int = BATCH) -> Any:
    """``fn`` on consecutive slices of ``columns`` (same length); the outputs concatenated:
    torch tensors with ``torch.cat``, numpy arrays with ``np.concatenate``, dicts of arrays
    key by key."""
    n = len(columns[0])
    outs = [fn(*(c[i : i + size] for c in columns)) for i in range(0, n, size)]
    return _concat(outs)


def _concat(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in outs]) for k in first}
    if isinstance(first, np.ndarray):
        return np.concatenate(outs)
    import torch

    return torch.cat(outs)


def embed_set(actor: Any, manifest: pd.DataFrame, batch: dict[str, np.ndarray], out: Path) -> None:
    """The embed actor over a decoded set; ``out/embeddings/part-00000.parquet`` with the
    ``serfiq`` column when the actor computes it."""

    def call(index, path, image, error, resized_from):  # noqa: ANN001, ANN202 - array slices
        r = actor(
            {
                "index": index,
                "path": path,
                "image": image,
                "error": error,
                "resized_from": resized_from,
            }
        )
        return {k: np.asarray(r[k]) for k in ("embedding", "serfiq") if k in r}

    n = len(manifest)
    r = in_batches(
        call,
        np.arange(n, dtype=np.int64),
        np.asarray(batch["path"], object),
        np.asarray(batch["image"]),
        np.asarray(batch["error"], object),
        np.asarray(batch.get("resized_from", [""] * n), object),
    )
    extra = {"serfiq": r["serfiq"]} if "serfiq" in r else {}
    table = embedding_batch(
        manifest["path"].to_numpy(object),
        manifest["identity"].to_numpy(object),
        r["embedding"],
        extra,
    )
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_batches([table]), out / "embeddings" / "part-00000.parquet")


def degradation_spearman(degradation: np.ndarray, **qualities: np.ndarray) -> dict[str, float]:
    """Spearman(q, degradation) per named quality (MagFace: lower quality, more degraded, so
    a working quality is clearly negative), rounded to 3 decimals."""
    return {
        name: round(float(spearmanr(q, degradation).correlation), 3)
        for name, q in qualities.items()
    }


def evaluate_qualities(
    folder: Path, eval_root: str, alpha: float, beta: float, qualities: Sequence[str]
) -> Any:
    """Generated pairs of ``folder``'s embeddings (10 genuine, 5 impostor per image, seed 0)
    and ``run_evaluation`` (no Ray) into ``folder/eval``: the quality EDC of ``qualities``,
    cosine and QMagFace at ``alpha``/``beta``, intervals, score files, the pose_band report."""
    from qmag_ray.config import load_config
    from qmag_ray.embeddings import load_embeddings
    from qmag_ray.pairs.generate import generate_pairs
    from qmag_ray.workflows.config import EvaluateConfig
    from qmag_ray.workflows.evaluate import run_evaluation

    table = load_embeddings(str(folder))
    resolved = generate_pairs(table, 10, 5, 0)
    pd.DataFrame(
        {
            "a": table.path[resolved.idx_a],
            "b": table.path[resolved.idx_b],
            "label": resolved.label,
        }
    ).to_csv(folder / "pairs.csv", index=False)
    cfg = load_config(
        EvaluateConfig,
        None,
        {
            "embeddings": str(folder),
            "pairs": str(folder / "pairs.csv"),
            "output": str(folder / "eval"),
            "alpha": alpha,
            "beta": beta,
            "quality.compare": list(qualities),
            "report.groups": ["pose_band"],
            "report.group_file": f"{eval_root}/manifest.parquet",
            "on_duplicate": "skip",
        },
    )
    return run_evaluation(cfg, use_ray=False)


def timed_alternation(
    callables: dict[str, Callable[[Any], Any]], batches: Sequence[Any]
) -> tuple[dict[str, float], dict[str, float]]:
    """Each callable on every batch, in turn batch by batch; (wall, CPU) seconds per name."""
    wall = dict.fromkeys(callables, 0.0)
    cpu = dict.fromkeys(callables, 0.0)
    for b in batches:
        for name, fn in callables.items():
            w, c = time.perf_counter(), time.process_time()
            fn(b)
            wall[name] += time.perf_counter() - w
            cpu[name] += time.process_time() - c
    return wall, cpu
