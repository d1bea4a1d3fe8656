"""Tracking set-up and run logging against a real SQLite store; credentials never recorded."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow_fixtures import free_port, make_calibration, sqlite_tracking  # noqa: F401

from qmag_ray.tracking.runs import git_commit, grid_table, tracked_run
from qmag_ray.tracking.sanitize import REDACTED, metric_key, numeric_items, redact_text, sanitize
from qmag_ray.tracking.uri import (
    DEFAULT_TRACKING_URI,
    TrackingUnreachableError,
    check_tracking_reachable,
    default_artifact_location,
    resolve_tracking_uri,
)

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-Pa55"


# --- tracking URI -------------------------------------------------------------------------
def test_resolve_tracking_uri_precedence() -> None:
    env = {"MLFLOW_TRACKING_URI": "http://env:5000"}
    assert resolve_tracking_uri("http://flag:5000", env) == "http://flag:5000"
    assert resolve_tracking_uri(None, env) == "http://env:5000"
    assert resolve_tracking_uri("  ", env) == "http://env:5000"
    assert resolve_tracking_uri(None, {}) == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert resolve_tracking_uri(None, {"MLFLOW_TRACKING_URI": ""}) == DEFAULT_TRACKING_URI


def test_sqlite_artifacts_live_beside_the_database(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    assert default_artifact_location(uri) == (tmp_path / "db" / "mlruns").as_uri()
    assert default_artifact_location("http://x:5000") is None


def test_unreachable_http_server_fails_fast_naming_the_redacted_uri() -> None:
    port = free_port()  # nothing listens there
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    with pytest.raises(TrackingUnreachableError) as err:
        check_tracking_reachable(uri, timeout=3)
    message = str(err.value)
    assert f"http://127.0.0.1:{port}" in message
    assert SECRET not in message and "alice" not in message


def test_unreachable_database_server_and_missing_sqlite_directory(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(TrackingUnreachableError, match=f"127.0.0.1:{port}"):
        check_tracking_reachable(f"postgresql://u:{SECRET}@127.0.0.1:{port}/mlflow", timeout=3)
    missing = tmp_path / "nope" / "mlflow.db"
    with pytest.raises(TrackingUnreachableError, match="does not exist"):
        check_tracking_reachable(f"sqlite:///{missing}")
    with pytest.raises(TrackingUnreachableError, match="names no database"):
        check_tracking_reachable("sqlite:///:memory:")
    check_tracking_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a new file is fine


# --- sanitising -----------------------------------------------------------------------------
def test_redact_text_removes_credentials_in_uris_queries_and_pairs() -> None:
    text = (
        f"s3://AKIA:{SECRET}@bucket/x https://u:{SECRET}@host/p?X-Amz-Signature={SECRET}&a=1 "
        f"password={SECRET} api_key: {SECRET}"
    )
    clean = redact_text(text)
    assert SECRET not in clean
    assert "s3://bucket/x" in clean and "https://host/p?X-Amz-Signature=REDACTED&a=1" in clean


def test_sanitize_nested_secret_keys_and_reports_their_names() -> None:
    found: list[str] = []
    data = {
        "data": {"uri": f"s3://k:{SECRET}@b/p", "aws_secret_access_key": SECRET},
        "auth": {"token": SECRET, "Password": SECRET},
        "list": [f"gs://x:{SECRET}@b/y", 3],
        "n_fmr": 50,
        "fmr_key": "1e-03",
    }
    clean = sanitize(data, redacted=found)
    assert SECRET not in json.dumps(clean)
    assert clean["data"]["uri"] == "s3://b/p" and clean["list"] == ["gs://b/y", 3]
    assert clean["data"]["aws_secret_access_key"] == REDACTED
    assert clean["n_fmr"] == 50 and clean["fmr_key"] == "1e-03"
    assert clean["auth"] == REDACTED  # a secret-looking key hides its whole value
    assert sorted(found) == ["auth", "aws_secret_access_key"]
    assert sanitize({"db": {"Password": SECRET}}, redacted=found) == {"db": {"Password": REDACTED}}


def test_metric_keys_and_numeric_leaves() -> None:
    assert metric_key("fnmr@fmr=1e-3") == "fnmr_at_fmr_1e-3"
    report = {"cosine": {"eer": 0.1, "auc": 0.9, "curve": [1, 2]}, "n": 3, "ok": True, "s": "x"}
    assert numeric_items(report) == {"cosine.eer": 0.1, "cosine.auc": 0.9, "n": 3.0, "ok": 1.0}


# --- git ------------------------------------------------------------------------------------
def test_git_commit_of_the_checkout_and_unknown_outside(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    commit, _ = git_commit(REPO / "qmag_ray")
    assert commit == head
    # A checkout of our own: clean, then dirty after a change to a tracked file.
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    own = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_commit(repo / "pkg") == (own, False)
    (repo / "pkg" / "__init__.py").write_text("x = 2\n")
    assert git_commit(repo / "pkg") == (own, True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "__init__.py").write_text("")
    assert git_commit(outside) == ("unknown", None)


# --- a recorded run -------------------------------------------------------------------------
@pytest.mark.mlflow
def test_tracked_run_records_everything_and_no_credentials(
    sqlite_tracking: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    calibration = make_calibration(extra={"data_uri": f"s3://AKIA:{SECRET}@bucket/embeddings"})
    params = {
        "grid": {"n_fmr": 50, "n_weights": 20},
        "seed": 7,
        "pair_mode": "listed",
        "model_uri": f"https://bob:{SECRET}@models.example/magface.pth",
        "model_sha256": "ab" * 32,
        "data_uris": [f"s3://AKIA:{SECRET}@bucket/embeddings", "s3://bucket/pairs.csv"],
        "embeddings_fingerprint": "f" * 16,
        "aws_secret_access_key": SECRET,
    }
    metrics = {"cosine": {"fnmr@fmr=1e-3": 0.05, "eer": 0.02}, "qmagface": {"auc": 0.99}}
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with tracked_run(kind="calibrate", ray_address="127.0.0.1:6379", run_name="t") as run:
        recorded = run.log_params(params)
        run.log_metrics(metrics)
        run.log_calibration(calibration)
        run.log_json("metrics.json", {**metrics, "token": SECRET, "note": f"s3://a:{SECRET}@b"})
        run.log_figure("plots/roc.png", fig)
        run.set_tags({"source": f"s3://AKIA:{SECRET}@bucket/x"})
    plt.close(fig)
    assert recorded["model_uri"] == "https://models.example/magface.pth"

    data = mlflow.get_run(run.run_id).data
    assert data.params["grid.n_fmr"] == "50" and data.params["seed"] == "7"
    assert data.params["pair_mode"] == "listed" and data.params["model_sha256"] == "ab" * 32
    assert data.params["embeddings_fingerprint"] == "f" * 16
    assert data.params["aws_secret_access_key"] == REDACTED
    assert json.loads(data.params["data_uris"])[0] == "s3://bucket/embeddings"
    assert data.metrics["cosine.fnmr_at_fmr_1e-3"] == 0.05
    assert data.metrics["qmagface.auc"] == 0.99
    assert data.metrics["alpha"] == calibration.alpha and data.metrics["n_impostor"] == 45_000
    head, _ = git_commit()
    assert data.tags["qmag_ray.git_commit"] == head != "unknown"
    assert data.tags["qmag_ray.ray_address"] == "127.0.0.1:6379"
    assert data.tags["qmag_ray.kind"] == "calibrate"
    assert "aws_secret_access_key" in data.tags["qmag_ray.redacted_keys"]

    # Artifacts sit beside the database and hold what was logged.
    artifacts = tmp_path / "mlruns" / run.run_id / "artifacts"
    names = {p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()}
    assert names == {"calibration.json", "metrics.json", "grid_table.csv", "plots/roc.png"}
    stored = json.loads((artifacts / "calibration.json").read_text())
    assert stored["alpha"] == calibration.alpha
    assert stored["extra"]["data_uri"] == "s3://bucket/embeddings"
    assert (artifacts / "plots/roc.png").read_bytes()[:4] == b"\x89PNG"
    table = (artifacts / "grid_table.csv").read_text().splitlines()
    assert table[0].startswith("fmr,optimal_weight,optimal_threshold,fnmr_optimal,fnmr_w=")
    assert len(table) == 1 + len(calibration.fmrs)

    # The secret is nowhere in the store: database file and every artifact.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.mlflow
def test_failed_block_marks_the_run_failed(sqlite_tracking: str) -> None:  # noqa: F811
    import mlflow

    with pytest.raises(RuntimeError, match="boom"), tracked_run(kind="evaluate") as run:
        raise RuntimeError("boom")
    assert mlflow.get_run(run.run_id).info.status == "FAILED"


def test_grid_table_columns() -> None:
    calibration = make_calibration()
    table = grid_table(calibration)
    assert list(table["fmr"]) == calibration.fmrs
    assert list(table["fnmr_optimal"]) == [0.2, 0.1, 0.04]
    assert list(table["fnmr_w=-0.01"]) == [0.2, 0.1, 0.05]
