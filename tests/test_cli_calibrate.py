"""``qmag-ray calibrate`` and ``qmag-ray evaluate`` end to end: real Ray, real SQLite MLflow."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer.main
from mlflow_fixtures import free_port, tracking_at
from typer.testing import CliRunner
from workflow_data import HARMFUL, HELPFUL, synthetic_table, write_lfw_pairs, write_table

from qmag_ray.calibration.result import QMagFaceCalibration
from qmag_ray.cli import app

GRID = ["--fmr-min", "1e-3", "--n-fmr", "12"]


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite MLflow store in ``tmp_path`` (MLflow's globals reset afterwards)."""
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}") as uri:
        yield uri


@pytest.fixture(scope="module")
def lfw(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list]:
    folder = tmp_path_factory.mktemp("lfw")
    table = synthetic_table(120, 5, 64, seed=4, lfw_paths=True, root="lfw", **HELPFUL)
    pairs = write_lfw_pairs(folder / "lfw_pairs.txt", 120, 5)
    return write_table(table, folder), folder / "lfw_pairs.txt", pairs


@pytest.mark.ray
@pytest.mark.mlflow
def test_calibrate_records_the_run_and_registers_the_scorer(
    ray_cluster: None,
    store: str,
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    embeddings = write_table(synthetic_table(**HELPFUL), tmp_path / "emb")
    out = tmp_path / "out"
    code, text = invoke(
        [
            "calibrate",
            "--embeddings",
            embeddings,
            "--output",
            str(out),
            *GRID,
            "--tracking-uri",
            store,
            "--register-as",
            "faces",
            "--shards",
            "3",
        ]
    )
    assert code == 0, text
    cal = QMagFaceCalibration.from_file(str(out / "calibration.json"))
    assert (
        f"alpha = {cal.alpha:.6f}" in text
        and "guard (QMagFace not worse than cosine): PASSED" in text
    )
    assert "registry: faces version 1" in text

    client = MlflowClient(store)
    (run,) = client.search_runs(client.get_experiment_by_name("qmag-ray").experiment_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["grid.n_fmr"] == "12" and params["pair_mode"] == "generate"
    assert params["validation.mode"] == "auto" and params["shards"] == "3"
    assert metrics["alpha"] == cal.alpha and metrics["beta"] == cal.beta
    assert metrics["guard_passed"] == 1.0
    held = cal.extra["validation"]["rows"]
    at_1e3 = next(r for r in held if r["target"] and r["fmr"] == 1e-3)
    assert metrics["held_out.qmagface.fnmr_at_fmr_1e-03"] == at_1e3["qmagface_fnmr"]
    assert "in_sample.cosine.accuracy" in metrics and "held_out.cosine.eer" in metrics
    assert tags["qmag_ray.kind"] == "calibrate" and tags["qmag_ray.guard"] == "passed"
    assert tags["qmag_ray.git_commit"] and tags["qmag_ray.registered"] == "faces/1"
    artifacts = artifact_paths(client, run.info.run_id)
    expected = {
        "calibration.json",
        "metrics.json",
        "grid_table.csv",
        "held_out.csv",
        "plots/det.png",
        "plots/weight_threshold.png",
        "plots/held_out/det.png",
    }
    assert expected <= artifacts

    (version,) = client.search_model_versions("name = 'faces'")
    assert version.run_id == run.info.run_id and version.tags["qmag_ray.guard"] == "passed"
    assert float(version.tags["alpha"]) == cal.alpha

    # The first version whose guard passed is champion: README's consumer line works as is.
    from qmag_ray.tracking.consumer import load_scorer

    assert "registry: models:/faces@champion -> version 1" in text
    assert tags["qmag_ray.aliases"] == "champion"
    assert load_scorer("models:/faces@champion", tracking_uri=store).version == "1"

    # A later version leaves the champion alone and says how to promote; --alias moves one.
    base = ["calibrate", "--embeddings", embeddings, *GRID, "--tracking-uri", store]
    code, text = invoke([*base, "--output", str(tmp_path / "o2"), "--register-as", "faces"])
    assert code == 0, text
    assert "registry: faces version 2" in text and "--alias champion" in text
    assert str(client.get_model_version_by_alias("faces", "champion").version) == "1"
    code, text = invoke(
        [*base, "--output", str(tmp_path / "o3"), "--register-as", "faces", "--alias", "staging"]
    )
    assert code == 0, text
    assert "registry: models:/faces@staging -> version 3" in text
    assert str(client.get_model_version_by_alias("faces", "staging").version) == "3"
    assert str(client.get_model_version_by_alias("faces", "champion").version) == "1"


@pytest.mark.ray
@pytest.mark.mlflow
def test_calibrate_does_not_register_a_scorer_worse_than_cosine(
    ray_cluster: None,
    store: str,
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    embeddings = write_table(synthetic_table(**HARMFUL), tmp_path / "emb")
    code, text = invoke(
        [
            "calibrate",
            "--embeddings",
            embeddings,
            "--output",
            str(tmp_path / "out"),
            *GRID,
            "--tracking-uri",
            store,
        ]
    )
    assert code == 0, text
    assert "guard (QMagFace not worse than cosine): FAILED" in text
    assert "NOT registered as a champion candidate" in text
    client = MlflowClient(store)
    (run,) = client.search_runs(client.get_experiment_by_name("qmag-ray").experiment_id)
    assert run.data.tags["qmag_ray.guard"] == "failed"
    assert "FAIL: FMR 1e-03" in run.data.tags["qmag_ray.guard_reasons"]
    assert run.data.metrics["guard_passed"] == 0.0
    assert client.search_model_versions("name = 'qmagface'") == []
    saved = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert saved["extra"]["validation"]["guard"]["passed"] is False


@pytest.mark.ray
@pytest.mark.mlflow
def test_evaluate_prints_the_table_and_records_the_run(
    ray_cluster: None,
    store: str,
    lfw: tuple,
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    embeddings, pair_file, _ = lfw
    calibration = QMagFaceCalibration(alpha=0.08, beta=0.12, extra={"embedding_dim": 64})
    calibration.save(str(tmp_path / "calibration.json"))
    code, text = invoke(
        [
            "evaluate",
            "--embeddings",
            embeddings,
            "--pairs",
            str(pair_file),
            "--protocol",
            "lfw",
            "--prefix",
            "lfw",
            "--calibration",
            str(tmp_path / "calibration.json"),
            "--output",
            str(tmp_path / "eval"),
            "--tracking-uri",
            store,
        ]
    )
    assert code == 0, text
    assert "Accuracy % (10-fold)" in text and "600 of 600 pairs kept" in text
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    client = MlflowClient(store)
    (run,) = client.search_runs(client.get_experiment_by_name("qmag-ray").experiment_id)
    assert run.data.tags["qmag_ray.kind"] == "evaluate"
    assert run.data.tags["qmag_ray.protocol"] == "lfw"
    scores = doc["report"]["scores"]
    assert run.data.metrics["qmagface.accuracy"] == scores["qmagface"]["accuracy"]
    assert run.data.metrics["cosine.fnmr_at_fmr_1e-02"] == scores["cosine"]["fnmr_at_fmr"]["1e-02"]
    assert {"metrics.json", "plots/det.png", "plots/edc.png"} <= artifact_paths(
        client, run.info.run_id
    )


@pytest.mark.ray
@pytest.mark.mlflow
def test_evaluate_lists_missing_images_and_exits_nonzero(
    ray_cluster: None,
    store: str,
    lfw: tuple,
    tmp_path: Path,
) -> None:
    embeddings, pair_file, pairs = lfw
    lines = pair_file.read_text().splitlines()
    lines[1] = "Nobody_Here\t1\t2"
    broken = tmp_path / "lfw_broken.txt"
    broken.write_text("\n".join(lines) + "\n")
    code, text = invoke(
        [
            "evaluate",
            "--embeddings",
            embeddings,
            "--pairs",
            str(broken),
            "--prefix",
            "lfw",
            "--alpha",
            "0.08",
            "--beta",
            "0.12",
            "--output",
            str(tmp_path / "eval"),
            "--tracking-uri",
            store,
        ]
    )
    assert code == 2
    assert "'lfw/Nobody_Here/Nobody_Here_0001.jpg' (line 2)" in text
    assert "on_missing='skip'" in text and "Traceback" not in text
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_bad_inputs_fail_before_any_computation(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-embeddings")
    code, text = invoke(["calibrate", "--embeddings", missing, "--output", str(tmp_path / "o")])
    assert code == 2 and f"embeddings not found: {missing} does not exist" in text

    embeddings = write_table(synthetic_table(10, 3, 8), tmp_path / "emb")
    code, text = invoke(
        [
            "evaluate",
            "--embeddings",
            embeddings,
            "--pairs",
            "p.txt",
            "--protocol",
            "lfwx",
            "--alpha",
            "0.1",
            "--beta",
            "0.1",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "Invalid value for '--protocol'" in text and "lfwx" in text

    code, text = invoke(
        [
            "calibrate",
            "--embeddings",
            embeddings,
            "--output",
            "o",
            "--generate-pairs",
            "--exhaustive",
        ]
    )
    assert code == 2 and "at most one of --generate-pairs and --exhaustive" in text

    code, text = invoke(
        ["evaluate", "--embeddings", embeddings, "--pairs", "p.txt", "--output", "o"]
    )
    assert code == 2 and "calibration (--calibration)" in text
    assert "alpha (--alpha) and beta (--beta)" in text

    server = f"http://127.0.0.1:{free_port()}"
    code, text = invoke(
        [
            "calibrate",
            "--embeddings",
            embeddings,
            "--output",
            str(tmp_path / "o"),
            "--tracking-uri",
            server,
        ]
    )
    assert code == 2 and f"MLflow tracking server {server} is not reachable" in text
    assert "Traceback" not in text and not (tmp_path / "o").exists()


def test_every_option_has_help() -> None:
    for command in ("calibrate", "evaluate"):
        code, text = invoke([command, "--help"])
        assert code == 0
        cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{command} --{param.name} has no help text"
