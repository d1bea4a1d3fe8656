"""The pyfunc scorer: scoring semantics, clear errors, JSON-and-code storage, registry helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow_fixtures import make_calibration, random_pairs, sqlite_tracking  # noqa: F401
from oracle import oracle_cosine as cosine
from oracle import oracle_qmagface as qmagface_score

from qmag_ray.tracking.scorer import ScoringError, score_frame

CAL = make_calibration(embedding_dim=8)


def norms(x: np.ndarray) -> np.ndarray:
    """Row norms (the qualities), written out: expected values never come from qmag_ray."""
    return np.linalg.norm(np.asarray(x, np.float64), axis=1)


def expected(a: np.ndarray, b: np.ndarray, cal=CAL) -> np.ndarray:
    return qmagface_score(cosine(a, b), np.minimum(norms(a), norms(b)), cal.alpha, cal.beta)


def embedding_frame(a: np.ndarray, b: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"embedding_a": list(a), "embedding_b": [list(r) for r in b]})


# --- scoring semantics ----------------------------------------------------------------------
def test_embedding_and_cosine_forms_give_the_formula() -> None:
    a, b = random_pairs(50, 8)
    out = score_frame(CAL, embedding_frame(a, b))
    assert list(out.columns) == ["score", "cosine", "quality", "match"]
    np.testing.assert_allclose(out["score"], expected(a, b), rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["quality"], np.minimum(norms(a), norms(b)))
    # Pairs below alpha / beta are adjusted by quality (omega < 0), the others are not.
    low = out["cosine"] < CAL.alpha / CAL.beta
    assert low.any() and (out["score"][low] < out["cosine"][low]).all()
    assert (out["score"][~low] == out["cosine"][~low]).all()
    same = score_frame(
        CAL, pd.DataFrame({"cosine": cosine(a, b), "quality_a": norms(a), "quality_b": norms(b)})
    )
    np.testing.assert_allclose(same["score"], out["score"], rtol=0, atol=1e-12)


def test_match_uses_the_stored_threshold_of_the_requested_fmr() -> None:
    frame = pd.DataFrame(
        {"cosine": [0.9, 0.35, 0.25, 0.1], "quality_a": [30.0] * 4, "quality_b": [30.0] * 4}
    )
    scores = qmagface_score(frame["cosine"], np.full(4, 30.0), CAL.alpha, CAL.beta)
    for fmr, key in ((1e-3, "1e-03"), (1e-4, "1e-04"), (1e-2, "1e-02")):
        out = score_frame(CAL, frame, fmr=fmr)
        assert out["match"].dtype == bool
        assert list(out["match"]) == list(scores >= CAL.thresholds[key])
    assert score_frame(CAL, frame)["match"].tolist() == list(scores >= 0.30)  # default 1e-3


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"cosine": [0.1], "quality_a": [1.0]}), "missing column.*quality_b"),
        (pd.DataFrame({"embedding_a": [[1.0] * 8]}), "missing column.*embedding_b"),
        (pd.DataFrame({"foo": [1.0]}), "unknown column.*'foo'.*either embedding_a, embedding_b"),
        (pd.DataFrame({"cosine": [0.1]}), "missing column.*quality_a, quality_b"),
        (
            pd.DataFrame({"embedding_a": [[1.0] * 8], "embedding_b": [[1.0] * 8], "cosine": [1.0]}),
            "not both",
        ),
        (
            pd.DataFrame({"embedding_a": [[1.0] * 7], "embedding_b": [[1.0] * 7]}),
            "size 7; this calibration was fitted on embeddings of size 8",
        ),
        (
            pd.DataFrame({"embedding_a": [[1.0] * 8, [1.0] * 9], "embedding_b": [[1.0] * 8] * 2}),
            "mixes embedding sizes: row 0 has 8 values, row 1 has 9",
        ),
        (
            pd.DataFrame(
                {"embedding_a": [[1.0] * 8, [np.nan] + [1.0] * 7], "embedding_b": [[1.0] * 8] * 2}
            ),
            "'embedding_a' has NaN or infinite values, first in row 1",
        ),
        (
            pd.DataFrame({"embedding_a": [[0.0] * 8], "embedding_b": [[1.0] * 8]}),
            "all-zero embedding",
        ),
        (
            pd.DataFrame({"cosine": [0.1, np.nan], "quality_a": [1.0] * 2, "quality_b": [1.0] * 2}),
            "'cosine' has NaN or infinite values, first in row 1",
        ),
        (
            pd.DataFrame({"cosine": [0.1], "quality_a": [-1.0], "quality_b": [1.0]}),
            "'quality_a' row 0 is negative",
        ),
        # Issue 12: out-of-range values were scored (cosine 5.0 answered match: true).
        (
            pd.DataFrame({"cosine": [0.3, 5.0], "quality_a": [20.0] * 2, "quality_b": [20.0] * 2}),
            r"'cosine' row 1 lies outside \[-1, 1\]",
        ),
        (
            pd.DataFrame({"cosine": [-1.5], "quality_a": [20.0], "quality_b": [20.0]}),
            r"'cosine' row 0 lies outside \[-1, 1\]",
        ),
        (
            pd.DataFrame({"cosine": [0.3, 0.2], "quality_a": [20.0] * 2, "quality_b": [3.0, 0.0]}),
            "'quality_b' row 1 is zero; .* must be > 0",
        ),
        (
            pd.DataFrame({"cosine": [0.3], "quality_a": [np.inf], "quality_b": [3.0]}),
            "'quality_a' has NaN or infinite values, first in row 0",
        ),
        # Issue 12: extra columns were ignored silently.
        (
            pd.DataFrame({"cosine": [0.3], "quality_a": [2.0], "quality_b": [3.0], "qualty": [1]}),
            "unknown column.*'qualty'",
        ),
    ],
)
def test_bad_input_is_a_clear_error(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(ScoringError, match=message):
        score_frame(CAL, frame)


def test_unequal_embedding_sizes_without_a_recorded_dimension() -> None:
    cal = make_calibration()  # no embedding_dim recorded
    frame = pd.DataFrame({"embedding_a": [[1.0] * 4], "embedding_b": [[1.0] * 5]})
    with pytest.raises(ScoringError, match="embedding_a has size 4 but embedding_b has size 5"):
        score_frame(cal, frame)
    ok = pd.DataFrame({"embedding_a": [[1.0, 2.0]], "embedding_b": [[2.0, 1.0]]})
    assert score_frame(cal, ok)["cosine"].iloc[0] == pytest.approx(0.8)


def test_fmr_without_threshold_and_bad_fmr() -> None:
    frame = pd.DataFrame({"cosine": [0.1], "quality_a": [1.0], "quality_b": [1.0]})
    with pytest.raises(ScoringError, match=r"no threshold for FMR 1e-05.*1e-04, 1e-03, 1e-02"):
        score_frame(CAL, frame, fmr=1e-5)
    with pytest.raises(ScoringError, match="must lie in"):
        score_frame(CAL, frame, fmr=2.0)


# --- the stored model -----------------------------------------------------------------------
@pytest.mark.mlflow
def test_logged_model_is_json_and_code_and_predicts_with_params(
    sqlite_tracking: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from qmag_ray.tracking.runs import tracked_run
    from qmag_ray.tracking.scorer import log_scorer

    cal = make_calibration(embedding_dim=8, extra={"source": "s3://key:hunter2@bucket/x"})
    with tracked_run(kind="calibrate"):
        info = log_scorer(cal)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "m")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "artifacts/calibration.json" in files and "pyfunc_entry.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    stored = json.loads((local / "artifacts/calibration.json").read_text())
    assert stored["extra"]["source"] == "s3://bucket/x"  # sanitised
    assert stored["alpha"] == cal.alpha and stored["thresholds"] == cal.thresholds

    model = mlflow.pyfunc.load_model(info.model_uri)
    signature = model.metadata.signature
    assert signature.params.to_dict()[0] == {
        "name": "fmr",
        "type": "double",
        "default": 0.001,
        "shape": None,
    }
    # No input schema: MLflow would drop unknown columns silently and echo inputs in errors.
    assert signature.inputs is None
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["cosine", "quality_a", "quality_b"]

    a, b = random_pairs(20, 8, seed=3)
    out = model.predict(embedding_frame(a, b), params={"fmr": 1e-4})
    np.testing.assert_allclose(out["score"], expected(a, b, cal), rtol=0, atol=1e-12)
    assert list(out["match"]) == list(expected(a, b, cal) >= cal.thresholds["1e-04"])
    with pytest.raises(MlflowException, match="missing column"):
        model.predict(pd.DataFrame({"cosine": [0.5], "quality_a": [20.0]}))
    with pytest.raises(MlflowException, match="no threshold for FMR 0.5"):
        model.predict(embedding_frame(a, b), params={"fmr": 0.5})
    with pytest.raises(MlflowException, match="unknown column.*'extra'") as err:
        model.predict(embedding_frame(a, b).assign(extra=1.0))
    assert str(a[0, 0])[:8] not in str(err.value)  # names the column, echoes no vector
    # Issue 12: MLflow drops undeclared params before predict (a warning only); the scorer
    # refuses them, and the next request in the same process is not affected.
    with pytest.raises(MlflowException, match=r"unknown parameter\(s\) 'threshold'"):
        model.predict(embedding_frame(a, b), params={"fmr": 1e-4, "threshold": 0.1})
    out = model.predict(embedding_frame(a, b), params={"fmr": 1e-4})
    assert list(out["match"]) == list(expected(a, b, cal) >= cal.thresholds["1e-04"])


def test_params_and_messages_do_not_echo_data() -> None:
    from qmag_ray.tracking.scorer import check_params

    assert check_params(None) == 1e-3 and check_params({"fmr": 1e-4}) == 1e-4
    with pytest.raises(ScoringError, match="unknown parameter.*'threshold'; the scorer takes fmr"):
        check_params({"fmr": 1e-3, "threshold": 0.1})
    vector = [0.123456789] * 8
    frame = pd.DataFrame({"embedding_a": [vector, [np.nan] * 8], "embedding_b": [vector] * 2})
    with pytest.raises(ScoringError) as err:
        score_frame(CAL, frame)
    assert "row 1" in str(err.value) and "embedding_a" in str(err.value)
    assert "0.123" not in str(err.value)


@pytest.mark.mlflow
def test_registry_versions_tags_aliases_and_the_service_helper(
    sqlite_tracking: str,  # noqa: F811
) -> None:
    from qmag_ray.tracking.consumer import load_scorer
    from qmag_ray.tracking.registry import (
        CHAMPION,
        TAG_FINGERPRINT,
        alias_version,
        find_versions,
        move_alias,
        register_scorer,
        set_alias,
    )
    from qmag_ray.tracking.runs import tracked_run

    first = make_calibration(0.07, 0.12, embedding_dim=8, fingerprint="data-1")
    second = make_calibration(0.09, 0.14, embedding_dim=8, fingerprint="data-2")
    with tracked_run(kind="recalibrate"):
        v1 = register_scorer(first, model_name="qm", tags={"note": "first"})
        v2 = register_scorer(second, model_name="qm")
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    assert v1.tags["alpha"] == "0.07" and v1.tags["note"] == "first"
    assert json.loads(v2.tags["thresholds"]) == second.thresholds
    assert [str(v.version) for v in find_versions("qm", TAG_FINGERPRINT, "data-2")] == ["2"]
    assert find_versions("qm", TAG_FINGERPRINT, "data-3") == []

    assert alias_version("qm", CHAMPION) is None
    with pytest.raises(LookupError, match="alias 'champion'"):
        load_scorer("models:/qm@champion", tracking_uri=sqlite_tracking)
    set_alias("qm", CHAMPION, "1")
    # Compare-and-set: a stale expectation leaves the alias alone.
    assert not move_alias("qm", CHAMPION, "2", expected=None)
    assert str(alias_version("qm", CHAMPION).version) == "1"
    assert move_alias("qm", CHAMPION, "2", expected="1")

    scorer = load_scorer("models:/qm@champion", tracking_uri=sqlite_tracking)
    assert scorer.version == "2" and scorer.calibration.alpha == 0.09
    a, b = random_pairs(10, 8, seed=5)
    result = scorer.score(a, b)
    np.testing.assert_allclose(result.score, expected(a, b, second), rtol=0, atol=1e-12)
    assert result.threshold == 0.30 and list(result.match) == list(result.score >= 0.30)
    single = scorer.score(a[0], b[0], fmr=1e-4)
    assert single.score.shape == (1,) and single.threshold == 0.45
    by_cos = scorer.score_cosine(cosine(a, b), norms(a), norms(b))
    np.testing.assert_allclose(by_cos.score, result.score, rtol=0, atol=1e-12)
    with pytest.raises(ScoringError, match="fitted on embeddings of size 8"):
        scorer.score(a[:, :4], b[:, :4])
    assert load_scorer("models:/qm/1", tracking_uri=sqlite_tracking).calibration.alpha == 0.07
