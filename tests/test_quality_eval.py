"""Quality evaluation (EDC, pAUC), identity-bootstrap intervals, d', bob score files, quality
columns from the embeddings or a joined file, and per-group reports.

Expected values are worked by hand in the comments, or come from a plain reader written here
(bob's documented CSV rule: a row is genuine iff probe_subject_id == bio_ref_subject_id).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qmag_ray import metrics
from qmag_ray.embeddings import EmbeddingTable, write_embeddings
from qmag_ray.quality.columns import QualityColumnError, with_quality
from qmag_ray.quality.edc import evaluate_quality, step_area
from qmag_ray.reports.bootstrap import distribution_stats, identity_bootstrap, weighted_fnmr_eer
from qmag_ray.reports.groups import group_report
from qmag_ray.reports.scorefiles import read_score_file, score_file_frame, write_score_file

sys.path.insert(0, str(Path(__file__).parent))

# Five genuine pairs (score, pair quality) and ten impostors (all of pair quality 10).
GEN_S = [0.2, 0.9, 0.3, 0.8, 0.7]
GEN_Q = [1.0, 2.0, 2.0, 3.0, 4.0]
IMP_S = [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.35, 0.4, 0.45, 0.5]


def _hand_data():
    s = np.array(GEN_S + IMP_S)
    y = np.array([1] * 5 + [0] * 10, np.int8)
    q = np.array(GEN_Q + [10.0] * 10)
    return s, y, q


def test_step_area_by_hand():
    # 0.4 on [0, 0.2), 0.25 on [0.2, 0.6), 0 after: up to 0.5 -> 0.08 + 0.075
    assert step_area(np.array([0, 0.2, 0.6]), np.array([0.4, 0.25, 0.0]), 0.5) == pytest.approx(
        0.155
    )
    assert step_area(np.array([0, 0.2]), np.array([0.4, 0.25]), 0.2) == pytest.approx(0.08)
    with pytest.raises(ValueError, match="start at fraction 0"):
        step_area(np.array([0.1]), np.array([0.3]), 0.2)


def test_edc_pauc_random_and_oracle_against_values_worked_by_hand():
    s, y, q = _hand_data()
    ev = evaluate_quality(s, y, {"q": q, "q_reversed": 20 - q}, fmr=0.1, limit=1.0, pauc_limit=0.5)
    # FMR 0.1 on 10 impostors allows 1 false match: the bound is the 2nd highest impostor
    # (0.45); the ISO threshold is the smallest genuine score above it, 0.7. Genuine errors
    # below 0.7: 0.2 and 0.3 -> FNMR 2/5.
    assert ev.threshold == pytest.approx(0.7)
    c = ev.curves["q"]
    # distinct genuine qualities 1, 2, 3, 4 discard 0, 1, 3, 4 of 5 genuine pairs
    np.testing.assert_allclose(c.discard, [0.0, 0.2, 0.6, 0.8])
    # kept {all}: 2/5; q>=2: {0.9, 0.3, 0.8, 0.7} -> 1/4; q>=3: 0/2; q>=4: 0/1
    np.testing.assert_allclose(c.fnmr_fixed, [0.4, 0.25, 0.0, 0.0])
    assert c.pauc == pytest.approx(0.4 * 0.2 + 0.25 * 0.3)
    # impostors all have quality 10, so re-deriving gives the same threshold
    np.testing.assert_allclose(c.fnmr_rederived, [0.4, 0.25, 0.0, 0.0])
    # reversed quality discards the good pairs first: kept q'>=16 is {0.7}; ... by hand:
    # q' = 19, 18, 18, 17, 16 -> cuts at 16 (0 out), 17 (1 out: 0.7), 18 (2 out), 19 (4 out)
    r = ev.curves["q_reversed"]
    np.testing.assert_allclose(r.discard, [0.0, 0.2, 0.4, 0.8])
    np.testing.assert_allclose(r.fnmr_fixed, [0.4, 2 / 4, 2 / 3, 1.0])
    assert r.pauc > c.pauc
    # random order: the 0 % FNMR everywhere -> 0.4 * 0.5
    assert ev.random.pauc == pytest.approx(0.2)
    # oracle: drop the lowest-scoring genuine pairs one by one: 2/5, 1/4, 0/3, 0, 0 (never all)
    np.testing.assert_allclose(ev.oracle.fnmr_fixed, [0.4, 0.25, 0.0, 0.0, 0.0])
    assert ev.oracle.pauc == pytest.approx(0.4 * 0.2 + 0.25 * 0.2)
    rows = {row["measure"]: row for row in ev.table_rows()}
    assert rows["q"]["pauc_vs_random"] == pytest.approx(0.155 / 0.2)
    assert "pAUC@50%" in ev.format_table()


def test_edc_limit_stops_at_the_discard_limit_and_needs_a_measurable_fmr():
    s, y, q = _hand_data()
    ev = evaluate_quality(s, y, {"q": q}, fmr=0.1, limit=0.5, pauc_limit=0.2)
    np.testing.assert_allclose(ev.curves["q"].discard, [0.0, 0.2])
    with pytest.raises(ValueError, match="cannot be measured"):
        evaluate_quality(s, y, {"q": q}, fmr=0.01)


def _identity_pairs(n_ids: int, seed: int = 0):
    """Genuine and impostor pairs of ``n_ids`` identities, scores with identity effects."""
    rng = np.random.default_rng(seed)
    ida, idb, s, y = [], [], [], []
    effect = rng.normal(0, 0.05, n_ids)
    for i in range(n_ids):
        for _ in range(3):
            ida.append(f"id{i}"), idb.append(f"id{i}")
            s.append(0.6 + effect[i] + rng.normal(0, 0.12)), y.append(1)
        for j in rng.choice(n_ids, 6, replace=False):
            if j == i:
                continue
            ida.append(f"id{i}"), idb.append(f"id{j}")
            s.append(rng.normal(0.05, 0.1)), y.append(0)
    return np.array(s), np.array(y, np.int8), np.array(ida, object), np.array(idb, object)


def test_unit_weights_reproduce_the_plain_metrics():
    s, y, _, _ = _identity_pairs(60)
    fmrs = np.array([1e-1, 1e-2])
    fnmr, e = weighted_fnmr_eer(s, y, np.ones(len(s)), fmrs)
    np.testing.assert_allclose(fnmr, metrics.fnmr_at_fmr(s, y, fmrs), atol=1e-12)
    assert e == pytest.approx(metrics.eer(s, y), abs=1e-12)


def test_bootstrap_intervals_contain_the_estimate_and_shrink_as_pairs_grow():
    widths = []
    for n_ids in (40, 640):
        s, y, ida, idb = _identity_pairs(n_ids, seed=1)
        rep = identity_bootstrap(s, y, ida, idb, (1e-1, 1e-2), replicates=300, seed=0)
        assert rep.unit == "identity" and rep.n_units == n_ids
        for iv in [rep.eer, *rep.fnmr_at_fmr.values()]:
            assert iv.low <= iv.value <= iv.high
        assert rep.eer.value == pytest.approx(metrics.eer(s, y))
        widths.append(rep.eer.high - rep.eer.low)
    assert widths[1] < widths[0] / 2  # 16x the identities: about 4x narrower


def test_bootstrap_without_identities_resamples_pairs():
    s, y, _, _ = _identity_pairs(30)
    rep = identity_bootstrap(s, y, None, None, (1e-1,), replicates=50)
    assert rep.unit == "pair" and rep.notes


def test_d_prime_by_hand():
    # genuine 1, 3 (mean 2, sd 1); impostor 0, 0 (mean 0, sd 0): d' = 2 / sqrt(1/2)
    d = distribution_stats(np.array([1.0, 3.0, 0.0, 0.0]), np.array([1, 1, 0, 0]))
    assert d["genuine_mean"] == 2 and d["genuine_std"] == 1 and d["impostor_std"] == 0
    assert d["d_prime"] == pytest.approx(2 / math.sqrt(0.5))


def test_score_files_follow_bobs_documented_csv_layout(tmp_path):
    frame = score_file_frame(
        path_a=np.array(["a/1.jpg", "a/1.jpg", "c/1.jpg"], object),
        id_a=np.array(["a", "a", None], object),
        path_b=np.array(["a/2.jpg", "b/1.jpg", "c/2.jpg"], object),
        id_b=np.array(["a", "b", None], object),
        label=np.array([1, 0, 1]),
        cosine=np.array([0.7, 0.1, 0.5]),
        qmagface=np.array([0.69, -0.2, 0.4]),
        quality_a=np.array([20.0, 20.0, 11.0]),
        quality_b=np.array([25.0, 30.0, 12.0]),
        system="qmagface",
    )
    uri = write_score_file(str(tmp_path / "qmagface.csv"), frame)
    text = Path(uri).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    header = text.splitlines()[0].split(",")
    # bob.bio.base's CSVScoreWriter layout: the sample (template) and subject of each side,
    # then the score, then metadata columns
    assert header[:5] == [
        "probe_template_id",
        "probe_subject_id",
        "bio_ref_template_id",
        "bio_ref_subject_id",
        "score",
    ]
    assert len(rows) == 3
    # bob's split_csv_scores: genuine iff the subject ids are equal; it must agree with label,
    # also where an identity is unknown
    for row in rows:
        assert (row["probe_subject_id"] == row["bio_ref_subject_id"]) == (row["label"] == "1")
    assert [float(r["score"]) for r in rows] == [0.69, -0.2, 0.4]
    assert [float(r["cosine"]) for r in rows] == [0.7, 0.1, 0.5]
    back = read_score_file(uri)
    np.testing.assert_array_equal(back.labels, [1, 0, 1])


def test_a_bob_file_without_label_column_is_read_by_subject_equality(tmp_path):
    p = tmp_path / "bob.csv"
    p.write_text(
        "probe_template_id,probe_subject_id,bio_ref_template_id,bio_ref_subject_id,score\n"
        "x1,x,x2,x,0.9\nx1,x,y1,y,0.1\n"
    )
    s = read_score_file(str(p), "bob")
    np.testing.assert_array_equal(s.labels, [1, 0])
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="probe_subject_id"):
        read_score_file(str(tmp_path / "bad.csv"))


def _table(n=6):
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(n, 4)).astype(np.float32)
    return EmbeddingTable(
        np.array([f"p{i}/{k}.jpg" for i in range(n // 2) for k in range(2)], object),
        np.array([f"p{i}" for i in range(n // 2) for _ in range(2)], object),
        vec,
        np.linalg.norm(vec, axis=1),
    )


def test_a_quality_file_with_missing_rows_drops_those_images(tmp_path):
    t = _table()
    emb = str(tmp_path / "emb")
    write_embeddings(t, emb)
    pd.DataFrame({"path": t.path[[0, 1, 3, 4, 5]], "fiqa": [0.5, 0.6, 0.7, np.nan, 0.9]}).to_csv(
        tmp_path / "q.csv", index=False
    )
    out, info = with_quality(t, emb, "fiqa", str(tmp_path / "q.csv"))
    # rows 2 (absent) and 4 (empty) have no value: dropped and counted
    assert list(out.path) == [t.path[i] for i in (0, 1, 3, 5)]
    np.testing.assert_allclose(out.quality, [0.5, 0.6, 0.7, 0.9])
    np.testing.assert_array_equal(out.vectors, t.vectors[[0, 1, 3, 5]])
    assert info.n_missing == 2 and "left out like missing images" in info.note()
    # the norm is the embeddings' own column
    same, info0 = with_quality(t, emb, "quality")
    assert same is t and info0.n_missing == 0


def test_quality_columns_refuse_bad_input_naming_the_flag(tmp_path):
    t = _table()
    emb = str(tmp_path / "emb")
    write_embeddings(t, emb)
    with pytest.raises(QualityColumnError, match="--quality-column.*no column 'serfiq'"):
        with_quality(t, emb, "serfiq")
    pd.DataFrame({"path": t.path, "q": -np.arange(6.0)}).to_parquet(tmp_path / "q.parquet")
    with pytest.raises(QualityColumnError, match="negative"):
        with_quality(t, emb, "q", str(tmp_path / "q.parquet"))
    with pytest.raises(QualityColumnError, match="no column 'x'"):
        with_quality(t, emb, "x", str(tmp_path / "q.parquet"))


def test_group_report_by_hand():
    # two groups; global threshold of cosine at FMR 0.5 on 4 impostors (0.1, 0.2, 0.3, 0.4):
    # 2 false matches allowed, bound 0.2, threshold = smallest genuine above it = 0.5
    s = np.array([0.9, 0.5, 0.1, 0.8, 0.1, 0.2, 0.3, 0.4, 0.6])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1])
    ga = np.array(["A", "A", "A", "B", "A", "A", "B", "B", "A"], object)
    gb = np.array(["A", "A", "A", "B", "A", "A", "B", "B", "B"], object)
    rep = group_report(
        "pose",
        ga,
        gb,
        y,
        {"cosine": s},
        np.array(["A", "B", "A"], object),
        np.array([1.0, 2.0, 3.0]),
        fmr=0.5,
    )
    assert rep.thresholds["cosine"] == pytest.approx(0.5)
    a, b = rep.rows
    # A: genuine 0.9, 0.5, 0.1 -> 1/3 below 0.5; impostors 0.1, 0.2 -> none accepted
    assert a["cosine"] == {"fnmr": pytest.approx(1 / 3), "fmr": 0.0}
    # B: genuine 0.8 -> 0; impostors 0.3, 0.4 -> none
    assert b["cosine"] == {"fnmr": 0.0, "fmr": 0.0}
    assert rep.ratios["cosine"] == {"fnmr": None, "fmr": None}  # smallest is 0
    assert rep.mixed_pairs == 1
    assert rep.quality["A"]["median"] == 2.0
    assert "max/min" in rep.format_table()


def test_calibrate_on_another_quality_is_recorded_and_checked_downstream(tmp_path):
    from workflow_data import HELPFUL, synthetic_table, write_table

    from qmag_ray.config import load_config
    from qmag_ray.errors import WorkflowError
    from qmag_ray.tracking.scorer import ScoringError, score_frame, scorer_signature
    from qmag_ray.workflows.calibrate import run_calibration
    from qmag_ray.workflows.config import CalibrateConfig, EvaluateConfig
    from qmag_ray.workflows.evaluate import run_evaluation

    table = synthetic_table(120, 5, 32, seed=2, **HELPFUL)
    emb = write_table(table, tmp_path / "emb")
    # a quality on another scale: the norm divided by 40 (in (0, 1))
    pd.DataFrame({"path": table.path, "unit": table.quality / 40.0}).to_csv(
        tmp_path / "unit.csv", index=False
    )
    cfg = load_config(
        CalibrateConfig,
        None,
        {
            "embeddings": emb,
            "output": str(tmp_path / "cal"),
            "quality.column": "unit",
            "quality.file": str(tmp_path / "unit.csv"),
            "grid.fmr_min": 1e-3,
            "grid.n_fmr": 8,
            "tracking.register": False,
        },
    )
    cal = run_calibration(cfg, use_ray=False).calibration
    assert cal.extra["quality_column"] == "unit"
    # the grid scales with the quality: weights live in [-0.5 / max q, 0.5 / max q]
    assert max(abs(w) for w in cal.optimal_weights) <= 0.5 / (table.quality.max() / 40) + 1e-9
    # the scorer says which quality it expects and refuses to compute the norm instead
    assert scorer_signature("unit").params.to_dict()[1]["default"] == "unit"
    frame = pd.DataFrame({"embedding_a": [[1.0] * 32], "embedding_b": [[0.5] * 32]})
    with pytest.raises(ScoringError, match="fitted on the quality 'unit'"):
        score_frame(cal, frame)
    # evaluate with the norm against this calibration: refused, naming the flag
    ev = load_config(
        EvaluateConfig,
        None,
        {
            "embeddings": emb,
            "pairs": str(tmp_path / "pairs.csv"),
            "output": str(tmp_path / "ev"),
            "calibration": str(tmp_path / "cal" / "calibration.json"),
        },
    )
    with pytest.raises(WorkflowError, match="--quality-column unit"):
        run_evaluation(ev, use_ray=False)


def test_held_out_group_report_uses_the_calibrate_split(tmp_path):
    from workflow_data import HELPFUL, synthetic_table, write_table

    from qmag_ray.calibration.result import QMagFaceCalibration
    from qmag_ray.pairs.generate import identity_split
    from qmag_ray.workflows.groups import held_out_group_report

    table = synthetic_table(60, 5, 16, seed=3, **HELPFUL)
    emb = write_table(table, tmp_path / "emb")
    bands = np.where(np.arange(len(table)) % 2 == 0, "even", "odd")
    pd.DataFrame({"path": table.path, "band": bands}).to_parquet(tmp_path / "m.parquet")
    QMagFaceCalibration(alpha=0.05, beta=0.1).save(str(tmp_path / "cal.json"))
    rep = held_out_group_report(
        emb, str(tmp_path / "cal.json"), "band", str(tmp_path / "m.parquet"), fmr=1e-2
    )
    assert rep.groups == ["even", "odd"] and set(rep.thresholds) == {"cosine", "qmagface"}
    _, held = identity_split(table, 0.5, 0)
    # the quality distributions are those of the held-out identities' images only
    n_held = {g: int((bands[held] == g).sum()) for g in rep.groups}
    assert {g: int(rep.quality[g]["n"]) for g in rep.groups} == n_held
    assert "per-band report" in rep.format_table()
