"""The calibrate and evaluate workflows on synthetic embeddings written as real Parquet files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from oracle import oracle_fnmr_at_fmr
from oracle import oracle_qmagface as qmagface_score
from workflow_data import HARMFUL, HELPFUL, synthetic_table, write_lfw_pairs, write_table

from qmag_ray import metrics
from qmag_ray.calibration.fit import fit_qmagface
from qmag_ray.calibration.result import CalibrationGrid, QMagFaceCalibration
from qmag_ray.config import ConfigError, load_config
from qmag_ray.embeddings import EmbeddingTable, load_embeddings
from qmag_ray.errors import WorkflowError
from qmag_ray.pairs.generate import generate_pairs, identity_split
from qmag_ray.pairs.listed import score_pairs
from qmag_ray.pairs.resolve import ResolveError
from qmag_ray.pairs.sides import build_sides
from qmag_ray.validation import FmrRow, Validation, check_guard, target_fmrs
from qmag_ray.workflows.calibrate import CalibrationOutcome, run_calibration
from qmag_ray.workflows.config import CalibrateConfig, EvaluateConfig
from qmag_ray.workflows.evaluate import run_evaluation

GRID = {"grid.fmr_min": 1e-3, "grid.n_fmr": 12}
PNG = b"\x89PNG\r\n\x1a\n"


def calibrate_config(embeddings: str, output: Path, **overrides: object) -> CalibrateConfig:
    return load_config(
        CalibrateConfig,
        None,
        {"embeddings": embeddings, "output": str(output), **GRID, **overrides},
    )


@pytest.fixture(scope="module")
def helpful(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_table(synthetic_table(**HELPFUL), tmp_path_factory.mktemp("helpful"))


@pytest.fixture(scope="module")
def helpful_run(helpful: str, tmp_path_factory: pytest.TempPathFactory) -> CalibrationOutcome:
    out = tmp_path_factory.mktemp("helpful-out")
    return run_calibration(calibrate_config(helpful, out), use_ray=False)


@pytest.fixture(scope="module")
def harmful_run(tmp_path_factory: pytest.TempPathFactory) -> CalibrationOutcome:
    folder = write_table(synthetic_table(**HARMFUL), tmp_path_factory.mktemp("harmful"))
    out = tmp_path_factory.mktemp("harmful-out")
    return run_calibration(calibrate_config(folder, out), use_ray=False)


def _side_arrays(helpful: str, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independently rebuilt pairs of one side of the default split (fraction 0.5, seed 0)."""
    table = load_embeddings(helpful)
    part = table.take(identity_split(table, 0.5, 0)[side])
    return score_pairs(part, generate_pairs(part, 10, 5, 0))


def test_generated_pairs_calibration_writes_every_output(
    helpful_run: CalibrationOutcome, helpful: str
) -> None:
    out = Path(helpful_run.output)
    for name in ("calibration.json", "metrics.json", "grid_table.csv", "held_out.csv"):
        assert (out / name).is_file(), name
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert {"plots/det.png", "plots/weight_threshold.png", "plots/held_out/det.png"} <= set(pngs)
    assert all((out / p).read_bytes().startswith(PNG) for p in pngs)
    assert sorted(k for k in helpful_run.files if k.endswith(".png")) == pngs

    loaded = QMagFaceCalibration.from_file(str(out / "calibration.json"))
    assert loaded == helpful_run.calibration
    assert loaded.extra["validation"]["guard"]["passed"] is True
    assert loaded.extra["embedding_dim"] == 64
    assert len(pd.read_csv(out / "grid_table.csv")) == 12

    # Fitted on the fit-side identities only: the same as fitting their pairs directly.
    direct = fit_qmagface(*_side_arrays(helpful, 0), grid=CalibrationGrid(n_fmr=12, fmr_min=1e-3))
    assert (loaded.alpha, loaded.beta) == (direct.alpha, direct.beta)
    assert (loaded.n_genuine, loaded.n_impostor) == (direct.n_genuine, direct.n_impostor)

    doc = json.loads((out / "metrics.json").read_text())
    assert (
        set(doc["in_sample"]["scores"]) == set(doc["held_out"]["scores"]) == {"cosine", "qmagface"}
    )
    assert doc["in_sample"]["n_genuine"] == loaded.n_genuine
    assert doc["validation"]["identity_disjoint"] is True


def test_held_out_figures_are_those_of_the_held_out_identities(
    helpful_run: CalibrationOutcome, helpful: str
) -> None:
    cos, q, y = _side_arrays(helpful, 1)
    cal = helpful_run.calibration
    rows = [r for r in helpful_run.validation.rows if r.cosine_fnmr is not None]
    fmrs = np.array([r.fmr for r in rows])
    # Expected figures from the oracles (plain score formula, scikit-learn ROC).
    want_cos = oracle_fnmr_at_fmr(cos, y, fmrs)
    np.testing.assert_allclose([r.cosine_fnmr for r in rows], want_cos, rtol=0, atol=1e-12)
    qmag = qmagface_score(cos, q, cal.alpha, cal.beta)
    want_q = oracle_fnmr_at_fmr(qmag, y, fmrs)
    np.testing.assert_allclose([r.qmagface_fnmr for r in rows], want_q, rtol=0, atol=1e-12)
    comparison = helpful_run.validation.comparison
    assert comparison is not None and comparison.qmagface_eer == metrics.eer(qmag, y)
    assert [r.fmr for r in helpful_run.validation.rows if r.target] == [1e-3, 1e-2]


def test_split_is_identity_disjoint(helpful: str) -> None:
    table = load_embeddings(helpful)
    identity_of = {
        row.tobytes(): ident for row, ident in zip(table.vectors, table.identity, strict=True)
    }
    for seed in (0, 7):
        cfg = calibrate_config(helpful, Path("unused"), **{"validation.seed": seed})
        sides = build_sides(table, cfg, shards=2)
        assert sides.held_out is not None
        seen = []
        for side in (sides.fit, sides.held_out):
            # identities of the images the side's pairs actually use, found by their vectors
            seen.append({identity_of[v.tobytes()] for v in side.listed.vectors})
        assert not seen[0] & seen[1]
        assert len(seen[0]) == len(seen[1]) == 150
        assert seen[0] | seen[1] == set(table.identity)
        if seed == 0:
            first = seen[0]
    assert seen[0] != first  # another seed, another split


def test_guard_flags_a_scorer_worse_than_cosine(
    harmful_run: CalibrationOutcome, helpful_run: CalibrationOutcome
) -> None:
    for run, expected in ((harmful_run, False), (helpful_run, True)):
        guard = run.validation.guard
        assert guard.passed is expected
        assert run.guard_passed is expected
        worse = [
            r.qmagface_fnmr - r.cosine_fnmr > max(5e-4, 0.05 * r.cosine_fnmr)
            for r in run.validation.rows
            if r.target
        ]
        assert any(worse) is (not expected)
        saved = QMagFaceCalibration.from_file(run.files["calibration.json"])
        assert saved.extra["validation"]["guard"] == guard.to_dict()
        assert saved.extra["validation"]["guard"]["passed"] is expected  # the JSON form
        assert Validation.from_dict(saved.extra["validation"]) == run.validation  # read back
    assert any(r.startswith("FAIL: FMR 1e-03") for r in harmful_run.validation.guard.reasons)
    assert "guard (QMagFace not worse than cosine): FAILED" in harmful_run.summary()
    assert harmful_run.tracking_metrics()["guard_passed"] == 0.0


def test_check_guard_tolerances() -> None:
    def rows(c: float | None, q: float | None) -> list[FmrRow]:
        return [FmrRow(fmr=1e-3, target=True, cosine_fnmr=c, qmagface_fnmr=q)]

    kw = {"tolerance": 0.1, "abs_tolerance": 0.001}
    assert check_guard(rows(0.20, 0.22), 10_000, **kw).passed is True  # 0.02 = 10 % of 0.2
    assert check_guard(rows(0.20, 0.2201), 10_000, **kw).passed is False
    assert check_guard(rows(0.005, 0.006), 10_000, **kw).passed is True  # absolute 0.001
    assert check_guard(rows(0.005, 0.0061), 10_000, **kw).passed is False
    undecided = check_guard(rows(None, None), 100, **kw)
    assert undecided.passed is None and "cannot be measured" in undecided.reasons[0]
    # 5,000 impostors allow 5 false matches at FMR 1e-3: too few to judge (default 10)
    noisy = check_guard(rows(0.20, 0.50), 5_000, **kw)
    assert noisy.passed is None and "not judged" in noisy.reasons[0]
    assert check_guard(rows(0.20, 0.50), 5_000, min_false_matches=5, **kw).passed is False


def test_target_fmrs() -> None:
    assert target_fmrs(CalibrationGrid()) == [1e-5, 1e-4, 1e-3, 1e-2]
    assert target_fmrs(CalibrationGrid(fmr_min=2e-4, fmr_max=5e-3)) == [2e-4, 1e-3, 5e-3]


def test_listed_pairs_split_leaves_cross_pairs_out(helpful: str, tmp_path: Path) -> None:
    table = load_embeddings(helpful)
    resolved = generate_pairs(table, 10, 5, seed=3)
    listing = tmp_path / "pairs.csv"
    pd.DataFrame(
        {
            "a": table.path[resolved.idx_a],
            "b": table.path[resolved.idx_b],
            "label": resolved.label,
        }
    ).to_csv(listing, index=False)
    cfg = calibrate_config(helpful, tmp_path / "out", pairs=str(listing), on_duplicate="skip")
    out = run_calibration(cfg, use_ray=False)
    fit, held = out.validation.fit_side, out.validation.held_out_side
    cross = fit["cross_pairs_left_out"]
    assert cross > 0 and fit["protocol"] == "generic"
    # impostor partners are drawn with replacement: repeats are skipped and counted
    skipped = fit["resolve"]["duplicates"]
    assert skipped > 0 and fit["resolve"]["kept"] == len(resolved) - skipped
    assert fit["n_genuine"] + held["n_genuine"] == resolved.counts()[0]  # genuine never cross
    total = fit["n_genuine"] + fit["n_impostor"] + held["n_genuine"] + held["n_impostor"] + cross
    assert total == len(resolved) - skipped
    assert any(f"{cross} listed pair(s)" in n for n in out.notes)
    assert out.calibration.n_impostor == fit["n_impostor"]


def test_exhaustive_mode_measures_metrics_on_a_sample(tmp_path: Path) -> None:
    folder = write_table(synthetic_table(150, 4, 32, seed=2, **HELPFUL), tmp_path / "emb")
    cfg = calibrate_config(folder, tmp_path / "out", pair_mode="exhaustive")
    out = run_calibration(cfg, use_ray=False)
    # 75 fit identities x 4 images: every pair of the 300 images
    assert out.calibration.n_genuine == 75 * 6
    assert out.calibration.n_impostor == 300 * 299 // 2 - 75 * 6
    sample = out.validation.fit_side["metrics_sample"]
    assert out.in_sample["n_impostor"] == sample["n_impostor"] < out.calibration.n_impostor
    assert any("not materialised" in n for n in out.notes)
    assert out.params["exhaustive_metrics"] == "sample of generated pairs"


def test_validation_with_a_given_pair_list(helpful: str, tmp_path: Path) -> None:
    table = load_embeddings(helpful)
    held = generate_pairs(table.take(np.arange(900, 1800)), 10, 1, seed=5)
    listing = tmp_path / "validation.csv"
    rows = np.arange(900, 1800)
    frame = pd.DataFrame(
        {
            "a": table.path[rows][held.idx_a],
            "b": table.path[rows][held.idx_b],
            "label": held.label,
        }
    )
    frame = frame[~frame[["a", "b"]].apply(frozenset, axis=1).duplicated()]
    frame.to_csv(listing, index=False)
    cfg = calibrate_config(helpful, tmp_path / "out", **{"validation.pairs": str(listing)})
    out = run_calibration(cfg, use_ray=False)
    assert out.validation.mode == "pairs"
    assert out.validation.held_out_side["n_impostor"] == int((frame["label"] == 0).sum())
    assert out.calibration.n_genuine == 300 * 15  # no split: every identity is fitted on
    assert any("not identity-disjoint" in n for n in out.notes)  # the list reuses identities


def test_unlabelled_embeddings_need_a_pair_list_and_get_no_split(
    helpful: str, tmp_path: Path
) -> None:
    table = load_embeddings(helpful)
    unlabelled = EmbeddingTable(table.path, None, table.vectors, table.quality)
    listing = tmp_path / "pairs.csv"
    listing.write_text(
        f"a,b,label\n{table.path[0]},{table.path[1]},1\n{table.path[0]},{table.path[9]},0\n"
    )
    sides = build_sides(unlabelled, calibrate_config(helpful, tmp_path, pairs=str(listing)), 1)
    assert sides.held_out is None and sides.validation_mode.value == "none"
    assert any("no identity labels" in n for n in sides.notes)
    split = calibrate_config(helpful, tmp_path, pairs=str(listing), **{"validation.mode": "split"})
    with pytest.raises(WorkflowError, match="1800 of 1800 have none"):
        build_sides(unlabelled, split, 1)
    with pytest.raises(WorkflowError, match="generate pairs need an identity label"):
        build_sides(
            unlabelled, calibrate_config(helpful, tmp_path, **{"validation.mode": "none"}), 1
        )


@pytest.fixture(scope="module")
def lfw_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list]:
    folder = tmp_path_factory.mktemp("lfw")
    table = synthetic_table(120, 5, 64, seed=4, lfw_paths=True, root="lfw", **HELPFUL)
    pairs = write_lfw_pairs(folder / "lfw_pairs.txt", 120, 5)
    return write_table(table, folder), folder / "lfw_pairs.txt", pairs


def test_evaluate_on_an_lfw_pair_file(lfw_data: tuple[str, Path, list], tmp_path: Path) -> None:
    embeddings, pair_file, pairs = lfw_data
    cfg = load_config(
        EvaluateConfig,
        None,
        {
            "embeddings": embeddings,
            "pairs": str(pair_file),
            "protocol": "lfw",
            "prefix": "lfw",
            "alpha": 0.08,
            "beta": 0.12,
            "output": str(tmp_path / "eval"),
        },
    )
    out = run_evaluation(cfg, use_ray=False)
    # the same numbers from the table's vectors, computed here
    table = load_embeddings(embeddings)
    ia = table.index_of([f"lfw/{a}" for a, _, _ in pairs])
    ib = table.index_of([f"lfw/{b}" for _, b, _ in pairs])
    a, b = table.vectors[ia].astype(np.float64), table.vectors[ib].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    q = np.minimum(table.quality[ia], table.quality[ib]).astype(np.float64)
    y = np.array([p[2] for p in pairs])
    qmag = qmagface_score(cos, q, 0.08, 0.12)
    rep = out.report["scores"]
    assert math.isclose(rep["cosine"]["eer"], metrics.eer(cos, y), abs_tol=1e-12)
    assert math.isclose(rep["qmagface"]["eer"], metrics.eer(qmag, y), abs_tol=1e-12)
    expected = metrics.benchmark_accuracy(qmag, y)
    assert math.isclose(rep["qmagface"]["accuracy"], expected["accuracy"], abs_tol=1e-9)
    assert rep["qmagface"]["accuracy_std"] > 0
    assert set(rep["qmagface"]["fnmr_at_fmr"]) == {"1e-01", "1e-02"}  # 300 impostors
    assert out.pairs["protocol"] == "lfw" and out.pairs["resolve"]["skipped"] == 0
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["report"]["n_pairs"] == 600 and doc["calibration"]["alpha"] == 0.08
    assert (tmp_path / "eval" / "plots" / "det.png").read_bytes().startswith(PNG)
    assert "Accuracy % (10-fold)" in out.summary()


def test_evaluate_missing_images_fail_or_are_counted(
    lfw_data: tuple[str, Path, list], tmp_path: Path
) -> None:
    embeddings, pair_file, pairs = lfw_data
    table = load_embeddings(embeddings)
    gone = {f"lfw/{pairs[0][0]}", f"lfw/{pairs[400][1]}"}
    keep = [i for i, p in enumerate(table.path) if p not in gone]
    partial = write_table(table.take(keep), tmp_path / "partial")
    base = {
        "embeddings": partial,
        "pairs": str(pair_file),
        "prefix": "lfw",
        "alpha": 0.08,
        "beta": 0.12,
        "output": str(tmp_path / "eval"),
    }
    with pytest.raises(ResolveError) as err:
        run_evaluation(load_config(EvaluateConfig, None, base), use_ray=False)
    assert "not in the embeddings table" in str(err.value)
    assert all(repr(name) in str(err.value) for name in gone)
    skipping = load_config(EvaluateConfig, None, {**base, "on_missing": "skip"})
    out = run_evaluation(skipping, use_ray=False)
    uses = sum(f"lfw/{a}" in gone or f"lfw/{b}" in gone for a, b, _ in pairs)
    assert out.pairs["resolve"]["missing"] == uses and out.pairs["resolve"]["missing_images"] == 2
    assert out.report["n_pairs"] == 600 - uses
    assert any(f"{uses} of 600 pairs skipped" in n for n in out.notes)
    assert out.tracking_metrics()["pairs_skipped"] == uses


def test_config_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "calibrate.yaml"
    path.write_text(
        "embeddings: s3://bucket/emb/\noutput: /tmp/out\npairs: s3://bucket/pairs.parquet\n"
        "grid: {n_fmr: 30, fmr_min: 1.0e-4}\nvalidation: {mode: none}\n"
        "tracking: {register_as: faces}\n"
    )
    cfg = load_config(CalibrateConfig, str(path), {"grid.n_fmr": 20, "on_missing": "skip"})
    assert cfg.grid == CalibrationGrid(n_fmr=20, fmr_min=1e-4)
    assert cfg.validation.mode.value == "none" and cfg.on_missing.value == "skip"
    assert cfg.tracking.register_as == "faces" and cfg.tracking.register is True
    assert cfg.resolved_pair_mode.value == "listed"


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        (CalibrateConfig, {"output": "o"}, r"missing required setting embeddings \(--embeddings\)"),
        (
            CalibrateConfig,
            {"embeddings": "e", "output": "o", "pairs": "p", "pair_mode": "exhaustive"},
            "not both",
        ),
        (
            CalibrateConfig,
            {"embeddings": "e", "output": "o", "grid": {"fmr_min": 0.5}},
            r"grid.fmr_min \(--fmr-min\) < grid.fmr_max \(--fmr-max\)",
        ),
        (
            CalibrateConfig,
            {"embeddings": "e", "output": "o", "validation": {"mode": "pairs"}},
            r"needs validation.pairs \(--validation-pairs\)",
        ),
        (
            CalibrateConfig,
            {"embeddings": "e", "output": "o", "pair_mode": "all"},
            "must be one of auto, listed, generate or exhaustive",
        ),
        (
            EvaluateConfig,
            {"embeddings": "e", "pairs": "p", "output": "o"},
            r"or both alpha \(--alpha\) and beta \(--beta\)",
        ),
        (
            EvaluateConfig,
            {"embeddings": "e", "pairs": "p", "output": "o", "calibration": "c", "alpha": 0.1},
            "either calibration",
        ),
    ],
)
def test_config_errors_name_the_problem(cls: type, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(cls, None, data)


@pytest.mark.ray
def test_ray_calibration_equals_the_in_process_one(
    ray_cluster: None, helpful: str, helpful_run: CalibrationOutcome, tmp_path: Path
) -> None:
    out = run_calibration(calibrate_config(helpful, tmp_path, shards=3), use_ray=True)
    assert out.calibration.extra["shards"] == 3
    assert (out.calibration.alpha, out.calibration.beta) == (
        helpful_run.calibration.alpha,
        helpful_run.calibration.beta,
    )
    assert out.validation.rows == helpful_run.validation.rows
    assert out.in_sample == helpful_run.in_sample
