"""A recalibration whose held-out guard fails: nothing is registered and no alias moves.

The images are embedded once by the real embed job (demo network); then every embedding in the
kept folder is replaced by a constructed one (same paths and identities), so the recalibration
reuses them all (it embeds only new images) and calibrates on known vectors. The validation
split (seeded: ``numpy.random.default_rng(seed).permutation`` of the sorted identity names, the
first half fits) is reproduced here to give each identity its role.

Fit half: every image has quality 10. A constant pair quality shifts every candidate weight's
scores by the same amount (``w * 10``), so every weight has the same FNMR at every FMR and the
spec's tie rule (section 3, step 3: the first weight in grid order, the most negative) picks
``w = -m = -0.5 / 10`` at every FMR: the line is flat, ``beta = 0`` and ``alpha = 0.05``.

Held-out half: two images per identity, genuine cosine 0.9, every impostor cosine exactly 0
(identities on disjoint coordinates), so cosine has FNMR 0 at every FMR. Eight identities have
quality 100 ("H"), eight quality 1 ("L"). QMagFace there is ``s - 0.05 q``: H genuine pairs
0.9 - 5 = -4.1, L genuine pairs 0.85, impostors -5 (both images H) or -0.05 (an L image). At
least half of the impostors come from the L identities' genuine pairs (impostors are drawn per
image of a genuine pair), so any threshold at or below -0.05 has an FMR of 50% or more; at FMR
0.1 QMagFace accepts only the 8 L genuine pairs: FNMR 8 / 16 = 50% against cosine's 0%, far
beyond the guard's allowed excess max(0.0005, 0.05 x 0) = 0.05 points. The guard fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow_fixtures import make_calibration, tracking_at
from typer.testing import CliRunner

from qmag_ray.embedding import EmbedConfig, run_embed
from qmag_ray.model import create_backbone, save_checkpoint
from qmag_ray.synth import SynthSpec, write_dataset

ARCH = "iresnet-demo"
N_IDENTITIES = 32  # 16 fit, 16 held out
FIT_QUALITY = 10.0
HIGH, LOW = 100.0, 1.0


def fit_vectors(n: int, dim: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fit identity two unit vectors in the first 8 coordinates, genuine cosines spread
    over [0.15, 0.99] among random impostor cosines (so the optimal thresholds differ by FMR)."""
    out = []
    for g in np.linspace(0.15, 0.99, n):
        c = rng.normal(size=8)
        c /= np.linalg.norm(c)
        p = rng.normal(size=8)
        p -= (p @ c) * c
        p /= np.linalg.norm(p)
        a, b = np.zeros(dim), np.zeros(dim)
        a[:8], b[:8] = c, g * c + np.sqrt(1 - g * g) * p
        out.append((a, b))
    return out


def held_out_vectors(j: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out identity ``j``: coordinates 8 + 2j and 9 + 2j only; genuine cosine 0.9."""
    a, b = np.zeros(dim), np.zeros(dim)
    a[8 + 2 * j] = 1.0
    b[8 + 2 * j], b[9 + 2 * j] = 0.9, np.sqrt(1 - 0.81)
    return a, b


def construct(parts: Path, seed: int = 0) -> tuple[set[str], set[str]]:
    """Rewrite every embedding part in place; returns (fit identities, held-out H identities)."""
    files = sorted(p for p in parts.rglob("*.parquet") if not p.name.startswith((".", "_")))
    tables = [pq.read_table(f) for f in files]
    paths = [p for t in tables for p in t.column("path").to_pylist()]
    identities = [i for t in tables for i in t.column("identity").to_pylist()]
    dim = tables[0].schema.field("embedding").type.list_size
    names = np.unique(np.asarray(identities, dtype=str))
    assert len(names) == N_IDENTITIES and len(paths) == 2 * N_IDENTITIES
    perm = np.random.default_rng(seed).permutation(len(names))
    fit = sorted(names[perm[: len(names) // 2]])
    held = sorted(names[perm[len(names) // 2 :]])
    high = set(held[: len(held) // 2])
    rng = np.random.default_rng(1)
    vectors: dict[str, tuple[np.ndarray, float]] = {}
    for name, (a, b) in zip(fit, fit_vectors(len(fit), dim, rng), strict=True):
        first, second = sorted(p for p, i in zip(paths, identities, strict=True) if i == name)
        vectors[first], vectors[second] = (a, FIT_QUALITY), (b, FIT_QUALITY)
    for j, name in enumerate(held):
        q = HIGH if name in high else LOW
        a, b = held_out_vectors(j, dim)
        first, second = sorted(p for p, i in zip(paths, identities, strict=True) if i == name)
        vectors[first], vectors[second] = (a, q), (b, q)
    for f, t in zip(files, tables, strict=True):
        rows = [vectors[p] for p in t.column("path").to_pylist()]
        emb = np.stack([v * q for v, q in rows]).astype(np.float32)
        columns = {
            "path": t.column("path"),
            "identity": t.column("identity"),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
            "quality": pa.array([q for _, q in rows], type=pa.float32()),
        }
        pq.write_table(pa.table(columns, schema=t.schema), f)
    # The fit half's genuine cosines lie inside its impostor cosines (oracle: plain numpy).
    unit = {p: v for p, (v, _) in vectors.items()}
    fit_paths = [p for p, i in zip(paths, identities, strict=True) if i in set(fit)]
    owner = dict(zip(paths, identities, strict=True))
    gen = [
        unit[a] @ unit[b] for a in fit_paths for b in fit_paths if a < b and owner[a] == owner[b]
    ]
    imp = [unit[a] @ unit[b] for a in fit_paths for b in fit_paths if owner[a] < owner[b]]
    assert max(imp) < max(gen) and sum(g < max(imp) for g in gen) >= 3
    return set(fit), high


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_a_recalibration_whose_guard_fails_registers_nothing(
    ray_cluster: None, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from qmag_ray.cli import app
    from qmag_ray.tracking.registry import (
        CHALLENGER,
        CHAMPION,
        alias_version,
        register_scorer,
        set_alias,
    )
    from qmag_ray.tracking.runs import tracked_run

    torch.manual_seed(0)
    save_checkpoint(create_backbone(ARCH).eval(), str(tmp_path / "demo.pth"), ARCH)
    write_dataset(
        str(tmp_path / "images"), SynthSpec(identities=N_IDENTITIES, images_per_identity=2)
    )
    run_embed(
        EmbedConfig(
            images=str(tmp_path / "images"),
            model=str(tmp_path / "demo.pth"),
            arch=ARCH,
            output=str(tmp_path / "embeddings"),
            batch_size=16,
        )
    )
    parts = tmp_path / "embeddings" / "embeddings"
    fit, high = construct(parts)
    # The gate's held-out protocol: every pair of the (constructed) images.
    table = pd.concat(
        pq.read_table(f, columns=["path", "identity"]).to_pandas()
        for f in sorted(parts.rglob("*.parquet"))
    )
    recs = table.to_dict("records")
    rows = [
        (x["path"], y["path"], int(x["identity"] == y["identity"]))
        for k, x in enumerate(recs)
        for y in recs[k + 1 :]
    ]
    pd.DataFrame(rows, columns=["a", "b", "label"]).to_csv(tmp_path / "holdout.csv", index=False)

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_at(tracking):  # a champion that must stay where it is
        with tracked_run(kind="calibrate", run_name="earlier"):
            version = str(register_scorer(make_calibration(), model_name="qmagface").version)
        set_alias("qmagface", CHAMPION, version)
    config = {
        "images": str(tmp_path / "images"),
        "embeddings": str(tmp_path / "embeddings"),
        "model": str(tmp_path / "demo.pth"),
        "arch": ARCH,
        "output": str(tmp_path / "runs"),
        "holdout": {"embeddings": str(parts), "pairs": str(tmp_path / "holdout.csv")},
        "register_as": "qmagface",
        "gate": {"target_fmr": 1e-2, "max_fnmr_increase": 1.0},
        "grid": {"n_fmr": 5, "fmr_min": 1e-2, "fmr_max": 1e-1, "n_weights": 5},
        "validation": {"mode": "split", "seed": 0},
        "embed": {"batch_size": 16},
        "tracking": {"tracking_uri": tracking, "experiment": "recal-guard"},
    }
    path = tmp_path / "recalibrate.yaml"
    path.write_text(yaml.safe_dump(config))

    result = CliRunner().invoke(app, ["recalibrate", "--config", str(path)])

    # A run that completed and decided not to register: exit code 0 (as calibrate).
    assert result.exit_code == 0, result.output
    text = result.output
    assert "0 new image(s) embedded, 64 reused" in text  # the constructed embeddings were used
    assert "registry: NOT registered as a champion candidate" in text
    assert "guard failed" in text and "registered version" not in text
    with tracking_at(tracking):
        client = MlflowClient()
        assert [str(v.version) for v in client.search_model_versions("name = 'qmagface'")] == [
            version
        ]
        assert str(alias_version("qmagface", CHAMPION).version) == version
        assert alias_version("qmagface", CHALLENGER) is None
        experiment = client.get_experiment_by_name("recal-guard")
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.data.tags["qmag_ray.outcome"] == "not_registered"
        assert "gate.promote" not in run.data.tags  # the gate was never reached
    (cal_file,) = (tmp_path / "runs").glob("*/calibration/calibration.json")
    saved = json.loads(cal_file.read_text())
    # The flat line of the fit half (worked by hand in the module docstring).
    assert saved["alpha"] == pytest.approx(0.5 / FIT_QUALITY, rel=1e-9)
    assert abs(saved["beta"]) < 1e-9
    assert saved["optimal_weights"] == pytest.approx([-0.5 / FIT_QUALITY] * 5, rel=1e-12)
    guard = saved["extra"]["validation"]["guard"]
    assert guard["passed"] is False
    assert (
        "FAIL: FMR 1e-01: QMagFace FNMR 50.000% vs cosine 0.000% (allowed excess 0.050 points)"
        in guard["reasons"]
    ), guard["reasons"]
    assert len(fit) == len(high) * 2 == N_IDENTITIES // 2
