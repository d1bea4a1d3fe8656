"""Against a real ``mlflow server`` subprocess: recorded runs, registry aliases, the gate, a fresh
consumer process and ``mlflow models serve``."""

from __future__ import annotations

import json
import subprocess
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow_fixtures import (  # noqa: F401
    VENV_BIN,
    MlflowServer,
    free_port,
    make_calibration,
    mlflow_server,
    random_pairs,
    running,
    subprocess_env,
    tracking_at,
)
from oracle import oracle_cosine as cosine
from oracle import oracle_qmagface as qmagface_score

from qmag_ray.calibration.result import QMagFaceCalibration
from qmag_ray.tracking.gate import GateConfig, fnmr_metric_name
from qmag_ray.tracking.promotion import promote_if_better
from qmag_ray.tracking.registry import CHAMPION, alias_version, register_scorer
from qmag_ray.tracking.runs import tracked_run

pytestmark = pytest.mark.mlflow

SECRET = "hunter2-secret"
MODEL = "qmagface"
DIM = 16
KEY = fnmr_metric_name(1e-3)


def norms(x: np.ndarray) -> np.ndarray:
    """Row norms (the qualities), written out: expected values never come from qmag_ray."""
    return np.linalg.norm(np.asarray(x, np.float64), axis=1)


def expected(cal: QMagFaceCalibration, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return qmagface_score(cosine(a, b), np.minimum(norms(a), norms(b)), cal.alpha, cal.beta)


@pytest.fixture()
def server(mlflow_server: MlflowServer) -> Iterator[str]:  # noqa: F811
    with tracking_at(mlflow_server.uri) as uri:
        yield uri


@pytest.fixture(scope="module")
def champion(mlflow_server: MlflowServer) -> QMagFaceCalibration:  # noqa: F811
    """Version 1 of ``qmagface``, made champion through the gate (no champion before it)."""
    cal = make_calibration(0.081, 0.131, embedding_dim=DIM, fingerprint="champion-data")
    with tracking_at(mlflow_server.uri), tracked_run(kind="recalibrate", run_name="champion"):
        version = register_scorer(cal, model_name=MODEL)
        result = promote_if_better(MODEL, version.version, {KEY: 0.04}, lambda v: {}, GateConfig())
    assert result.promoted and result.previous_champion is None
    return cal


def test_run_is_recorded_on_the_server_without_credentials(
    server: str,
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    import mlflow

    cal = make_calibration(extra={"data": f"s3://ak:{SECRET}@bucket/emb"})
    with tracked_run(kind="calibrate", ray_address="10.1.2.3:6379") as run:
        run.log_params({"data_uri": f"s3://ak:{SECRET}@bucket/emb", "seed": 3})
        run.log_metrics({"qmagface": {"eer": 0.01}})
        run.log_calibration(cal)
        run.log_json("metrics.json", {"qmagface": {"eer": 0.01}, "password": SECRET})
    data = mlflow.get_run(run.run_id).data
    assert data.params["data_uri"] == "s3://bucket/emb" and data.params["seed"] == "3"
    assert data.metrics["qmagface.eer"] == 0.01 and data.metrics["beta"] == cal.beta
    assert data.tags["qmag_ray.ray_address"] == "10.1.2.3:6379"
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, dst_path=str(tmp_path)))
    assert {p.name for p in local.iterdir()} == {
        "calibration.json",
        "metrics.json",
        "grid_table.csv",
    }
    assert json.loads((local / "calibration.json").read_text())["extra"]["data"] == (
        "s3://bucket/emb"
    )
    # Nothing under the server's root (database and proxied artifacts) holds the secret.
    files = [p for p in mlflow_server.root.rglob("*") if p.is_file()]
    assert any(p.name == "calibration.json" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_champion_loads_by_alias_in_a_fresh_process(
    champion: QMagFaceCalibration,
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = random_pairs(40, DIM, seed=11)
    np.savez(tmp_path / "pairs.npz", a=a, b=b)
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np, pandas as pd, mlflow
        from qmag_ray.tracking.consumer import load_scorer

        data = np.load(sys.argv[1])
        a, b = data["a"], data["b"]
        model = mlflow.pyfunc.load_model("models:/qmagface@champion")
        frame = pd.DataFrame({"embedding_a": list(a), "embedding_b": list(b)})
        out = model.predict(frame, params={"fmr": 1e-4})
        scorer = load_scorer("models:/qmagface@champion")
        result = scorer.score(a, b)
        print(json.dumps({
            "pyfunc": out["score"].tolist(), "match": out["match"].tolist(),
            "helper": result.score.tolist(), "version": scorer.version,
            "alpha": scorer.calibration.alpha,
        }))
        """
    )
    done = subprocess.run(
        [str(VENV_BIN / "python"), "-c", script, str(tmp_path / "pairs.npz")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(MLFLOW_TRACKING_URI=mlflow_server.uri),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    want = expected(champion, a, b)
    np.testing.assert_allclose(out["pyfunc"], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["helper"], want, rtol=0, atol=1e-12)
    assert out["match"] == list(want >= champion.thresholds["1e-04"])
    assert out["version"] == "1" and out["alpha"] == champion.alpha


def test_helper_loads_with_an_explicit_tracking_uri_only(
    champion: QMagFaceCalibration,
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Regression: with ``tracking_uri=`` given and no MLFLOW_TRACKING_URI, the ``models:/``
    download fell back to ``sqlite:///mlflow.db`` in the working directory (creating it) and
    failed with "Registered Model ... not found"."""
    script = textwrap.dedent(
        """
        import sys
        from qmag_ray.tracking.consumer import load_scorer

        scorer = load_scorer("models:/qmagface@champion", tracking_uri=sys.argv[1])
        print(scorer.version, scorer.calibration.alpha)
        """
    )
    env = subprocess_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [str(VENV_BIN / "python"), "-c", script, mlflow_server.uri],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    version, alpha = done.stdout.strip().splitlines()[-1].split()
    assert version == "1" and float(alpha) == champion.alpha
    assert not (tmp_path / "mlflow.db").exists()


def test_gate_moves_the_alias_only_for_a_better_challenger(server: str) -> None:
    name = "qmagface-gate"
    figures = {}

    def register(fnmr: float, alpha: float) -> str:
        version = str(register_scorer(make_calibration(alpha, 0.12), model_name=name).version)
        figures[version] = {KEY: fnmr}
        return version

    def evaluate(version) -> dict[str, float]:  # the champion, on the same held-out pairs
        return figures[str(version.version)]

    gate = GateConfig(max_fnmr_increase=0.001)
    with tracked_run(kind="recalibrate", run_name="gate"):
        v1 = register(0.050, 0.07)
        assert promote_if_better(name, v1, figures[v1], evaluate, gate).promoted
        v2 = register(0.040, 0.08)  # better: promoted
        result = promote_if_better(name, v2, figures[v2], evaluate, gate)
        assert result.promoted and result.previous_champion == v1
        assert str(alias_version(name, CHAMPION).version) == v2
        v3 = register(0.045, 0.09)  # worse beyond tolerance: champion stays
        result = promote_if_better(name, v3, figures[v3], evaluate, gate)
        assert not result.promoted and result.champion_version == v2
        assert str(alias_version(name, CHAMPION).version) == v2

        # A concurrent recalibration promotes v5 while v4 is being judged against v2:
        # v4 must be judged again against v5 (better than v4) and not take the alias.
        v4 = register(0.039, 0.10)
        v5 = register(0.030, 0.11)

        def evaluate_while_racing(version) -> dict[str, float]:
            if str(version.version) == v2:
                from qmag_ray.tracking.registry import set_alias

                set_alias(name, CHAMPION, v5)
            return figures[str(version.version)]

        result = promote_if_better(name, v4, figures[v4], evaluate_while_racing, gate)
        assert not result.promoted and result.champion_version == v5
        assert str(alias_version(name, CHAMPION).version) == v5

    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version(name, v3).tags
    assert tags["gate.promote"] == "false" and tags["gate.champion_version"] == v2
    assert json.loads(tags["gate.champion_metrics"]) == {KEY: 0.040}
    assert "FAIL" in tags["gate.reasons"]
    tags4 = MlflowClient().get_model_version(name, v4).tags
    assert tags4["gate.champion_version"] == v5 and tags4["gate.promote"] == "false"


@pytest.mark.slow
def test_models_serve_answers_with_the_same_scores(
    champion: QMagFaceCalibration,
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    port = free_port()
    args = [
        str(VENV_BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{MODEL}@{CHAMPION}",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    url = f"http://127.0.0.1:{port}"
    a, b = random_pairs(25, DIM, seed=21)
    want = expected(champion, a, b)
    env = subprocess_env(MLFLOW_TRACKING_URI=mlflow_server.uri)
    with running(args, tmp_path / "serve.log", f"{url}/ping", env):
        embeddings = {
            "dataframe_split": {
                "columns": ["embedding_a", "embedding_b"],
                "data": [[x.tolist(), y.tolist()] for x, y in zip(a, b, strict=True)],
            },
            "params": {"fmr": 1e-2},
        }
        out = _post(f"{url}/invocations", embeddings)
        rows = out["predictions"]
        np.testing.assert_allclose([r["score"] for r in rows], want, rtol=0, atol=1e-12)
        assert [r["match"] for r in rows] == list(want >= champion.thresholds["1e-02"])

        by_cosine = {
            "dataframe_records": [
                {"cosine": float(c), "quality_a": float(qa), "quality_b": int(qb)}
                for c, qa, qb in zip(cosine(a, b), norms(a), np.round(norms(b)), strict=True)
            ]
        }
        rows = _post(f"{url}/invocations", by_cosine)["predictions"]
        quality = np.minimum(norms(a), np.round(norms(b)))
        want_cos = qmagface_score(cosine(a, b), quality, champion.alpha, champion.beta)
        np.testing.assert_allclose([r["score"] for r in rows], want_cos, rtol=0, atol=1e-12)

        with pytest.raises(urllib.error.HTTPError) as err:
            _post(f"{url}/invocations", {"dataframe_records": [{"cosine": 0.5}]})
        assert err.value.code == 400
        assert "missing column(s) quality_a, quality_b" in err.value.read().decode()

        # Issue 12: out-of-range values and unknown columns were answered (cosine 5.0 matched);
        # now a 400 naming row and column, without echoing the vectors.
        bad = [
            (
                {"dataframe_records": [{"cosine": 5.0, "quality_a": 20.0, "quality_b": 21.0}]},
                "'cosine' row 0 lies outside [-1, 1]",
            ),
            (
                {"dataframe_records": [{"cosine": 0.5, "quality_a": 0.0, "quality_b": 21.0}]},
                "'quality_a' row 0 is zero",
            ),
            (
                {
                    "dataframe_split": {
                        **embeddings["dataframe_split"],
                        "columns": ["embedding_a", "embedding_b", "note"],
                        "data": [[*r, "x"] for r in embeddings["dataframe_split"]["data"]],
                    }
                },
                "unknown column(s) 'note'",
            ),
            # MLflow drops params the signature does not declare before predict sees them;
            # the scorer notices (scorer._UnknownParamsFilter) and refuses the request.
            (
                {**embeddings, "params": {"fmr": 1e-2, "threshold": 0.1}},
                "unknown parameter(s) 'threshold'; the scorer takes fmr, quality",
            ),
        ]
        for body, message in bad:
            with pytest.raises(urllib.error.HTTPError) as err:
                _post(f"{url}/invocations", body)
            text = err.value.read().decode()
            assert err.value.code == 400 and message in text, text
            assert repr(float(a[0, 0]))[:10] not in text  # no vector echoed
        rows = _post(f"{url}/invocations", embeddings)["predictions"]  # the server still serves
        np.testing.assert_allclose([r["score"] for r in rows], want, rtol=0, atol=1e-12)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())
