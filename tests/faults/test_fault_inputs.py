"""Inputs that are not what they claim: an interrupted embed output, parts of two models, a
calibration of another model (issue 12: all three were used silently).

Embed outputs are laid out by hand as the embed job writes them (run marker first, Parquet
parts with the model's sha256 in their key-value metadata, ``summary.json`` last), so each case
is exactly the situation of the issue; the workflows run without Ray (``use_ray=False``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow_fixtures import make_calibration
from workflow_data import synthetic_table, write_lfw_pairs

from qmag_ray.calibration.result import CalibrationGrid
from qmag_ray.embeddings import EmbeddingTable, to_arrow
from qmag_ray.pairs.protocols import PairProtocol
from qmag_ray.workflows.config import CalibrateConfig, EvaluateConfig
from qmag_ray.workflows.provenance import IncompleteEmbeddingsError, check_embedding_input

SHA_A, SHA_B = "a" * 64, "b" * 64


def embed_output(
    folder: Path,
    table: EmbeddingTable,
    shas: list[str],
    summary: dict | None,
) -> str:
    """An embed job output: marker, one part per entry of ``shas``, and optionally a summary."""
    (folder / "embeddings").mkdir(parents=True)
    (folder / "_embed_run.json").write_text(json.dumps({"model_sha256": shas[0]}))
    arrow = to_arrow(table)
    step = -(-len(table) // len(shas))
    for k, sha in enumerate(shas):
        part = arrow.slice(k * step, step).replace_schema_metadata(
            {b"qmag_ray.model_sha256": sha.encode()}
        )
        pq.write_table(part, folder / "embeddings" / f"part-{k:05d}.parquet")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_interrupted_output_is_refused_unless_allowed(tmp_path: Path) -> None:
    from qmag_ray.workflows.calibrate import run_calibration

    table = synthetic_table(60, 5, dim=16)
    out = embed_output(tmp_path / "emb", table, [SHA_A] * 3, summary=None)
    with pytest.raises(IncompleteEmbeddingsError) as err:
        check_embedding_input(out)
    text = str(err.value)
    assert f"--embeddings {out} has no summary.json: its embed run was interrupted" in text
    assert "(3 part file(s) so far)" in text and "--allow-incomplete" in text
    cfg = CalibrateConfig(embeddings=out, output=str(tmp_path / "cal"))
    with pytest.raises(IncompleteEmbeddingsError):
        run_calibration(cfg, use_ray=False)
    assert not (tmp_path / "cal").exists()  # refused before anything was written

    grid = CalibrationGrid(n_fmr=3, fmr_min=1e-2, fmr_max=1e-1, n_weights=5)
    allowed = CalibrateConfig(
        embeddings=out, output=str(tmp_path / "cal"), allow_incomplete=True, grid=grid
    )
    outcome = run_calibration(allowed, use_ray=False)
    recorded = outcome.calibration.extra["embeddings"]
    assert recorded["embed_complete"] is False and recorded["embed_status"] == "interrupted"
    assert any("used anyway (--allow-incomplete)" in n for n in outcome.validation.notes)


def test_failed_run_is_incomplete_and_a_succeeded_one_is_used(tmp_path: Path) -> None:
    table = synthetic_table(10, 4, dim=8)
    failed = embed_output(
        tmp_path / "f", table, [SHA_A], summary={"status": "failed", "model_sha256": SHA_A}
    )
    with pytest.raises(IncompleteEmbeddingsError, match="finished but failed embed run"):
        check_embedding_input(failed)
    done = embed_output(
        tmp_path / "s", table, [SHA_A, SHA_A], {"status": "succeeded", "model_sha256": SHA_A}
    )
    checked = check_embedding_input(done + "/embeddings")  # the parts folder itself, too
    assert (checked.complete, checked.model_sha256, checked.parts) == (True, SHA_A, 2)


def test_parts_of_two_models_are_refused_even_when_allowed(tmp_path: Path) -> None:
    table = synthetic_table(10, 4, dim=8)
    out = embed_output(
        tmp_path / "m",
        table,
        [SHA_A, SHA_B, SHA_A],
        {"status": "succeeded", "model_sha256": SHA_A},
    )
    with pytest.raises(IncompleteEmbeddingsError) as err:
        check_embedding_input(out, allow_incomplete=True)
    text = str(err.value)
    assert "mixes embeddings of 2 different models" in text
    assert f"sha256 {SHA_A[:12]}... in 3 file(s)" in text  # two parts + the summary
    assert f"sha256 {SHA_B[:12]}... in 1 file(s), e.g. part-00001.parquet" in text


def test_evaluate_refuses_a_calibration_of_another_model(tmp_path: Path) -> None:
    from qmag_ray.errors import WorkflowError
    from qmag_ray.workflows.evaluate import run_evaluation

    table = synthetic_table(30, 4, dim=16, lfw_paths=True, root="")
    table = EmbeddingTable(
        [p.lstrip("/") for p in table.path], table.identity, table.vectors, table.quality
    )
    out = embed_output(
        tmp_path / "e", table, [SHA_B], {"status": "succeeded", "model_sha256": SHA_B}
    )
    write_lfw_pairs(tmp_path / "pairs.txt", 30, 4, sets=2, per_set=10)
    cal = make_calibration(extra={"embeddings": {"embed_model_sha256": SHA_A}})
    cal.save(str(tmp_path / "calibration.json"))
    cfg = dict(
        embeddings=out,
        pairs=str(tmp_path / "pairs.txt"),
        output=str(tmp_path / "eval"),
        calibration=str(tmp_path / "calibration.json"),
        protocol=PairProtocol.LFW,
    )
    with pytest.raises(WorkflowError) as err:
        run_evaluation(EvaluateConfig(**cfg), use_ray=False)
    assert f"fitted on embeddings of model sha256 {SHA_A[:12]}" in str(err.value)
    assert "--allow-other-model" in str(err.value)
    outcome = run_evaluation(EvaluateConfig(**cfg, allow_other_model=True), use_ray=False)
    assert any("applied anyway (--allow-other-model)" in n for n in outcome.notes)
