"""``qmag-ray evaluate`` writes bob score files, intervals, the quality evaluation and group
reports; ``qmag-ray compare`` puts two evaluation runs (MLflow run ids) into one DET plot."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow_fixtures import tracking_at
from typer.testing import CliRunner
from workflow_data import HELPFUL, synthetic_table, write_lfw_pairs, write_table

from qmag_ray.cli import app


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[str]:
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}") as uri:
        yield uri


@pytest.mark.ray
@pytest.mark.mlflow
def test_evaluate_writes_score_files_and_compare_draws_two_runs(
    ray_cluster: None, store: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    table = synthetic_table(120, 5, 64, seed=4, lfw_paths=True, root="lfw", **HELPFUL)
    embeddings = write_table(table, tmp_path / "emb")
    pair_file = tmp_path / "lfw_pairs.txt"
    listed = write_lfw_pairs(pair_file, 120, 5)
    rng = np.random.default_rng(0)
    # an external quality (the norm with noise) and a pose band; 3 images without a quality
    side = pd.DataFrame(
        {
            "path": table.path,
            "ext": table.quality * rng.uniform(0.9, 1.1, len(table)),
            "pose": rng.choice(["frontal", "profile"], len(table)),
        }
    )
    side.loc[:2, "ext"] = np.nan
    side.to_parquet(tmp_path / "side.parquet")
    base = [
        "evaluate",
        "--embeddings",
        embeddings,
        "--pairs",
        str(pair_file),
        "--prefix",
        "lfw",
        "--tracking-uri",
        store,
        "--edc-fmr",
        "1e-2",
        "--bootstrap",
        "100",
    ]
    code, text = invoke(
        [
            *base,
            "--alpha",
            "0.08",
            "--beta",
            "0.12",
            "--output",
            str(tmp_path / "e1"),
            "--quality-column",
            "ext",
            "--quality-file",
            str(tmp_path / "side.parquet"),
            "--edc-quality",
            "ext",
            "--edc-quality",
            "quality",
            "--on-missing",
            "skip",
            "--group-column",
            "pose",
            "--group-file",
            str(tmp_path / "side.parquet"),
        ]
    )
    assert code == 0, text
    assert "error versus discard" in text and "per-pose report" in text
    assert "identity-bootstrap" in text or "bootstrap over" in text
    out = tmp_path / "e1"
    doc = json.loads((out / "metrics.json").read_text())
    scores = pd.read_csv(out / "scores" / "qmagface.csv")
    kept = doc["pairs"]["resolve"]["kept"]
    assert kept < len(listed) and len(scores) == kept  # pairs of the 3 images left out
    assert (scores["label"] == (scores.probe_subject_id == scores.bio_ref_subject_id)).all()
    assert np.allclose(scores["score"], scores["qmagface"])
    assert set(doc["quality_evaluation"]["curves"]) == {"ext", "quality"}
    assert doc["quality"]["n_missing"] == 3
    b = doc["bootstrap"]["qmagface"]["eer"]
    assert b["low"] <= b["value"] <= b["high"]
    assert "pose" in doc["groups"] and (out / "plots" / "quality_by_pose.png").stat().st_size
    assert (out / "plots" / "quality_edc.png").stat().st_size > 0

    code, text = invoke(
        [
            *base,
            "--alpha",
            "0.0",
            "--beta",
            "0.0",
            "--output",
            str(tmp_path / "e2"),
            "--no-score-files",
        ]
    )
    assert code == 0, text
    assert not (tmp_path / "e2" / "scores").exists()
    code, text = invoke(
        [*base, "--alpha", "0.0", "--beta", "0.0", "--output", str(tmp_path / "e3")]
    )
    assert code == 0, text
    client = MlflowClient(store)
    runs = client.search_runs(
        client.get_experiment_by_name("qmag-ray").experiment_id,
        order_by=["attributes.start_time ASC"],
    )
    first, last = runs[0].info.run_id, runs[-1].info.run_id
    code, text = invoke(
        [
            "compare",
            f"run:{first}",
            last,
            "--name",
            "ext",
            "--name",
            "plain",
            "--output",
            str(tmp_path / "cmp"),
            "--tracking-uri",
            store,
            "--bootstrap",
            "50",
        ]
    )
    assert code == 0, text
    for name in ("ext/cosine", "ext/qmagface", "plain/cosine", "plain/qmagface"):
        assert name in text
    table_ = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert len(table_) == 4 and (table_["eer_low"] <= table_["eer"]).all()
    assert (tmp_path / "cmp" / "det.png").stat().st_size > 0
    code, text = invoke(["compare", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "x")])
    assert code == 2 and "nope.csv" in text
