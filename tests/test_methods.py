"""Calibration methods (issue 6): paper, raw and direct, compared on held-out identities.

The issue's situation is regenerated at a size CI affords: 300 identities x 8 images, 128-d,
norm and angular noise both driven by a per-image quality, a wide norm range
(``methods_data.WIDE_NORMS``); alpha and beta are fitted on the pairs of half the identities
and judged on the pairs of the other half.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from methods_data import WIDE_NORMS, quality_faces
from oracle import oracle_fit, oracle_fnmr_at_fmr
from oracle import oracle_qmagface as qmagface_score
from test_calibration import synthetic
from workflow_data import write_table

from qmag_ray import fit_qmagface
from qmag_ray.calibration.direct import DirectSearch, evaluate_candidates, objective
from qmag_ray.calibration.fit import LocalExecutor
from qmag_ray.calibration.result import CalibrationGrid, QMagFaceCalibration
from qmag_ray.config import load_config
from qmag_ray.embeddings import load_embeddings
from qmag_ray.pairs.generate import generate_pairs, identity_split
from qmag_ray.pairs.listed import score_pairs
from qmag_ray.pairs.source import ArrayPairSource
from qmag_ray.validation import MethodComparison
from qmag_ray.workflows.calibrate import CalibrationOutcome, run_calibration
from qmag_ray.workflows.config import CalibrateConfig

GRID = CalibrationGrid(n_fmr=12, fmr_min=1e-3)
GRID_ARGS = {"grid.fmr_min": 1e-3, "grid.n_fmr": 12}


@pytest.mark.parametrize("rounded", [False, True])
def test_raw_method_equals_a_plain_slow_reference(rounded: bool) -> None:
    cos, q, y = side_arrays_small()
    if rounded:  # many tied scores
        cos, q = np.round(cos, 3), np.round(q)
    grid = CalibrationGrid(n_fmr=15, fmr_min=1e-3, n_weights=9)
    raw = fit_qmagface(cos, q, y, grid=grid, method="raw")
    # The oracle (one scikit-learn ROC per weight on w * q + s, nothing from qmag_ray).
    want = oracle_fit(cos, q, y, n_fmr=15, fmr_min=1e-3, n_weights=9, raw=True)
    assert (raw.alpha, raw.beta) == (want["alpha"], want["beta"])
    assert raw.optimal_thresholds == want["optimal_thresholds"].tolist()
    assert raw.method == "raw"
    # Raw thresholds are raw scores (mostly below 0.5), not sigmoid values (all above 0.5).
    paper = fit_qmagface(cos, q, y, grid=grid)
    assert min(paper.optimal_thresholds) > 0.5 > min(raw.optimal_thresholds)
    assert (paper.alpha, paper.beta) != (raw.alpha, raw.beta)


def test_candidate_evaluation_is_exact_against_full_sorts() -> None:
    cos, q, y = synthetic(n=30_000, seed=12, decimals=2)  # many tied scores
    fmrs = GRID.fmrs()
    candidates = np.array([[0.0, 0.0], [0.004, 0.0], [0.01, 0.02], [0.03, 0.05], [0.05, 0.3]])
    n_imp = int((y == 0).sum())
    for shards in (1, 4):
        source = ArrayPairSource(cos, q, y, shards=shards, block_size=3_001)
        run_pass = LocalExecutor(source).run_pass
        gen = y == 1
        accepted, _ = evaluate_candidates(
            run_pass, candidates, cos[gen], q[gen], n_imp, fmrs, float(q.max())
        )
        for row, (a, b) in zip(accepted, candidates, strict=True):
            fnmr = oracle_fnmr_at_fmr(qmagface_score(cos, q, a, b), y, fmrs)
            n_gen = int(y.sum())
            np.testing.assert_allclose((n_gen - row) / n_gen, fnmr, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def situation(tmp_path_factory: pytest.TempPathFactory) -> str:
    table = quality_faces(300, 8, 128, seed=0, **WIDE_NORMS)
    return write_table(table, tmp_path_factory.mktemp("situation"))


def side_arrays(embeddings: str, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One side of the default split (fraction 0.5, seed 0), rebuilt independently."""
    table = load_embeddings(embeddings)
    part = table.take(identity_split(table, 0.5, 0)[side])
    return score_pairs(part, generate_pairs(part, 10, 5, 0))


def test_direct_minimises_its_objective_and_records_it(situation: str) -> None:
    cos, q, y = side_arrays(situation, 0)
    cal = fit_qmagface(cos, q, y, grid=GRID, method="direct")
    paper = fit_qmagface(cos, q, y, grid=GRID)
    d = cal.extra["direct"]
    n_gen = int(y.sum())

    def brute(a: float, b: float) -> float:
        fnmr = oracle_fnmr_at_fmr(qmagface_score(cos, q, a, b), y, GRID.fmrs())
        return float(np.mean(np.log10(np.maximum(fnmr, 0.5 / n_gen))))

    assert d["objective_value"] == pytest.approx(brute(cal.alpha, cal.beta), abs=1e-12)
    assert d["objective_cosine"] == pytest.approx(brute(0.0, 0.0), abs=1e-12)
    assert d["paper_fit"] == {
        "alpha": paper.alpha,
        "beta": paper.beta,
        "objective": pytest.approx(brute(paper.alpha, paper.beta), abs=1e-12),
    }
    assert d["objective_value"] < d["objective_cosine"] < d["paper_fit"]["objective"]
    values = [h["objective"] for h in d["history"]]
    assert values == sorted(values, reverse=True) and len(values) == 1 + DirectSearch().rounds
    (a_lo, a_hi), (b_lo, b_hi) = d["bounds"]["alpha"], d["bounds"]["beta"]
    assert a_lo == b_lo == 0.0 and (a_hi, b_hi) == (2 * paper.alpha, 2 * paper.beta)
    assert 0 <= cal.alpha <= a_hi and 0 <= cal.beta <= b_hi
    assert d["evaluations"] > 41 * 41
    assert cal.method == "direct" and cal.optimal_weights == [] and cal.fnmr_table == []
    assert objective(np.array([[n_gen, 0]]), n_gen)[0] == pytest.approx(
        (math.log10(0.5 / n_gen) + 0.0) / 2
    )
    assert QMagFaceCalibration.from_dict(json.loads(cal.to_json())) == cal


@pytest.fixture(scope="module")
def compared(situation: str, tmp_path_factory: pytest.TempPathFactory) -> CalibrationOutcome:
    overrides = {
        "embeddings": situation,
        "output": str(tmp_path_factory.mktemp("compared")),
        "compare_methods": True,
        **GRID_ARGS,
    }
    return run_calibration(load_config(CalibrateConfig, None, overrides), use_ray=False)


def test_issue_situation_paper_fit_is_reproduced_and_flagged(
    compared: CalibrationOutcome, situation: str
) -> None:
    cal = compared.calibration
    assert cal.method == "paper"
    published = fit_qmagface(*side_arrays(situation, 0), grid=GRID)
    assert (cal.alpha, cal.beta) == (published.alpha, published.beta)
    assert cal.optimal_thresholds == published.optimal_thresholds

    guard = compared.validation.guard
    assert guard.passed is False and compared.guard_passed is False
    assert any(r.startswith("FAIL: FMR 1e-03") for r in guard.reasons)
    # Judged on the held-out identities: their pairs, rebuilt independently, give the rows.
    cos, q, y = side_arrays(situation, 1)
    rows = [r for r in compared.validation.rows if r.target]
    fmrs = [r.fmr for r in rows]
    assert fmrs == [1e-3, 1e-2]
    want_cos = oracle_fnmr_at_fmr(cos, y, fmrs)
    np.testing.assert_allclose([r.cosine_fnmr for r in rows], want_cos, rtol=0, atol=1e-12)
    paper_fnmr = oracle_fnmr_at_fmr(qmagface_score(cos, q, cal.alpha, cal.beta), y, fmrs)
    np.testing.assert_allclose([r.qmagface_fnmr for r in rows], paper_fnmr, rtol=0, atol=1e-12)
    assert (paper_fnmr > 2 * np.array([r.cosine_fnmr for r in rows])).all()


def test_compare_methods_reports_every_method_and_direct_beats_cosine(
    compared: CalibrationOutcome, situation: str
) -> None:
    methods = compared.validation.methods
    assert methods is not None
    assert methods.chosen == "paper" and methods.methods == ("paper", "raw", "direct")
    assert methods.guard == {"paper": False, "raw": True, "direct": True}
    assert methods.passing == ["raw", "direct"]
    cos, q, y = side_arrays(situation, 0)
    for name in ("raw", "direct"):
        fitted = fit_qmagface(cos, q, y, grid=GRID, method=name)
        assert (methods.fits[name].alpha, methods.fits[name].beta) == (fitted.alpha, fitted.beta)
    held = side_arrays(situation, 1)
    for row in (r for r in methods.rows if r.target):
        assert row.fnmr["direct"] <= row.cosine and row.fnmr["raw"] is not None
        fit = methods.fits["direct"]
        scores = qmagface_score(held[0], held[1], fit.alpha, fit.beta)
        want = oracle_fnmr_at_fmr(scores, held[2], [row.fmr])[0]
        assert row.fnmr["direct"] == pytest.approx(want, abs=1e-12)
    assert methods.eer["direct"] < methods.eer["cosine"] < methods.eer["paper"]

    saved = json.loads((Path(compared.output) / "calibration.json").read_text())
    assert saved["extra"]["validation"]["methods"] == json.loads(json.dumps(methods.to_dict()))
    assert MethodComparison.from_dict(saved["extra"]["validation"]["methods"]) == methods
    direct_row = next(r for r in saved["extra"]["validation"]["methods"]["rows"] if r["target"])
    assert set(direct_row) == {"fmr", "target", "cosine", "paper", "raw", "direct"}
    table = pd.read_csv(Path(compared.output) / "held_out_methods.csv")
    assert list(table.columns) == ["fmr", "target", "cosine", "paper", "raw", "direct"]
    text = compared.summary()
    assert "methods (fitted on the fit side; chosen: paper):" in text
    assert "guard                         FAILED     PASSED     PASSED" in text
    flat = compared.tracking_metrics()
    assert flat["held_out.methods.paper.guard_passed"] == 0.0
    assert flat["held_out.methods.direct.fnmr_at_fmr_1e-03"] == next(
        r.fnmr["direct"] for r in methods.rows if r.fmr == 1e-3
    )


def test_split_is_identity_disjoint(compared: CalibrationOutcome, situation: str) -> None:
    table = load_embeddings(situation)
    fit_rows, held_rows = identity_split(table, 0.5, 0)
    fit_ids, held_ids = set(table.identity[fit_rows]), set(table.identity[held_rows])
    assert compared.fit_identities == fit_ids and compared.held_out_identities == held_ids
    assert not fit_ids & held_ids and fit_ids | held_ids == set(table.identity)
    assert len(fit_ids) == len(held_ids) == 150
    assert compared.validation.identity_disjoint is True


def test_unknown_method_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'paper', 'raw' or 'direct'"):
        CalibrateConfig(embeddings="e", output=str(tmp_path), method="sigmoid")
    cos, q, y = synthetic(n=2_000, seed=1)
    with pytest.raises(ValueError, match="unknown calibration method 'best'"):
        fit_qmagface(cos, q, y, fmr_min=1e-2, fmr_max=5e-2, method="best")
    with pytest.raises(ValueError, match="points. must be odd"):
        DirectSearch(points=4)


@pytest.mark.ray
def test_ray_results_equal_in_process_with_one_and_several_shards(ray_cluster: None) -> None:
    from qmag_ray.calibration.distributed import RayExecutor
    from qmag_ray.calibration.fit import fit_pairs

    cos, q, y = side_arrays_small()
    settings = DirectSearch(coarse=15, rounds=2)
    for method in ("raw", "direct"):
        local = fit_qmagface(cos, q, y, grid=GRID, method=method, direct=settings)
        for shards in (1, 4):
            source = ArrayPairSource(cos, q, y, shards=shards, block_size=4_999)
            cal = fit_pairs(
                source, executor=RayExecutor(source), grid=GRID, method=method, direct=settings
            )
            assert (cal.alpha, cal.beta) == (local.alpha, local.beta), (method, shards)
            assert cal.thresholds == local.thresholds
            assert cal.extra.get("direct") == local.extra.get("direct")
            assert cal.extra["executor"] == "ray" and cal.extra["shards"] == shards


def side_arrays_small() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = quality_faces(120, 8, 128, seed=3, **WIDE_NORMS)
    return score_pairs(table, generate_pairs(table, 10, 5, 0))


@pytest.mark.ray
@pytest.mark.mlflow
def test_cli_direct_with_compare_methods_prints_the_table_and_records_the_guard(
    ray_cluster: None, situation: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from mlflow_fixtures import tracking_at
    from typer.testing import CliRunner

    from qmag_ray.cli import app

    out = tmp_path / "out"
    args = ["calibrate", "--embeddings", situation, "--output", str(out)]
    args += ["--fmr-min", "1e-3", "--n-fmr", "12", "--method", "direct", "--compare-methods"]
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}") as store:
        result = CliRunner().invoke(app, [*args, "--tracking-uri", store, "--shards", "3"])
        assert result.exit_code == 0, result.output
        text = result.output
        client = MlflowClient(store)
        (run,) = client.search_runs(client.get_experiment_by_name("qmag-ray").experiment_id)
        versions = client.search_model_versions("name = 'qmagface'")

    cal = QMagFaceCalibration.from_file(str(out / "calibration.json"))
    assert cal.method == "direct" and f"alpha = {cal.alpha:.6f}" in text
    assert "methods (fitted on the fit side; chosen: direct):" in text
    assert "                   cosine      paper        raw     direct" in text
    assert "guard                         FAILED     PASSED     PASSED" in text
    assert "guard (QMagFace not worse than cosine): PASSED" in text
    assert "registry: qmagface version 1" in text and len(versions) == 1

    tags, logged = run.data.tags, run.data.metrics
    assert tags["qmag_ray.method"] == "direct" and tags["qmag_ray.guard"] == "passed"
    assert tags["qmag_ray.methods_guard"] == "paper: failed, raw: passed, direct: passed"
    assert run.data.params["method"] == "direct"
    assert logged["guard_passed"] == 1.0 and logged["held_out.methods.paper.guard_passed"] == 0.0
    methods = cal.extra["validation"]["methods"]
    for name in ("paper", "raw", "direct"):
        assert logged[f"methods.{name}.alpha"] == methods["fits"][name]["alpha"]
        row = next(r for r in methods["rows"] if r["fmr"] == 1e-3)
        assert logged[f"held_out.methods.{name}.fnmr_at_fmr_1e-03"] == row[name]
    assert logged["methods.direct.alpha"] == cal.alpha
