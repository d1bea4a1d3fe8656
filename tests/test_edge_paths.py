"""Paths no other test walked: each asserts the one outcome it must have.

A calibration file of a newer format, held-out embeddings made with another model, a
promotion whose champion keeps moving, ``--wait-for-resources``, GPU-only options on a machine
without a GPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow_fixtures import make_calibration, sqlite_tracking  # noqa: F401

from qmag_ray.calibration.result import QMagFaceCalibration

# ----------------------------------------------------------------------------- calibration file


def test_calibration_file_of_a_newer_format_version_is_refused(tmp_path: Path) -> None:
    good = make_calibration()
    path = tmp_path / "calibration.json"
    good.save(str(path))
    assert QMagFaceCalibration.from_file(str(path)) == good
    doc = json.loads(path.read_text())
    assert doc["format"] == "qmag-ray/calibration" and doc["format_version"] == 1
    doc["format_version"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as err:
        QMagFaceCalibration.from_file(str(path))
    assert str(err.value) == (
        "calibration format version 2 is newer than this qmag-ray understands (1); upgrade qmag-ray"
    )
    doc["format"] = "something-else"
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ValueError, match="not a qmag-ray calibration \\(format is 'something-else'"
    ):
        QMagFaceCalibration.from_file(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        QMagFaceCalibration.from_file(str(path))
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        QMagFaceCalibration.from_file(str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------- held-out model


def test_held_out_embeddings_from_another_model_are_refused(tmp_path: Path) -> None:
    from qmag_ray.workflows.recalibrate_inputs import check_holdout_model

    held = tmp_path / "held"
    (held / "embeddings").mkdir(parents=True)
    other, ours = "b" * 64, "a" * 64
    (held / "summary.json").write_text(json.dumps({"model_sha256": other, "arch": "iresnet-demo"}))
    cfg = SimpleNamespace(holdout=SimpleNamespace(embeddings=str(held / "embeddings")))
    with pytest.raises(Exception) as err:
        check_holdout_model(cfg, ours)
    message = str(err.value)
    assert "were made with a checkpoint of sha256 bbbbbbbbbbbb..." in message
    assert "not the recalibration model (aaaaaaaaaaaa...)" in message
    assert "embed the held-out images with the same model" in message
    check_holdout_model(cfg, other)  # the same model: accepted


# ----------------------------------------------------------------------------- promotion retries


@pytest.mark.mlflow
def test_promotion_gives_up_when_the_champion_keeps_moving(
    sqlite_tracking: str,  # noqa: F811
) -> None:
    from qmag_ray.tracking.gate import GateConfig, fnmr_metric_name
    from qmag_ray.tracking.promotion import MAX_ATTEMPTS, promote_if_better
    from qmag_ray.tracking.registry import CHAMPION, alias_version, register_scorer, set_alias
    from qmag_ray.tracking.runs import tracked_run

    name, key = "qmagface-race", fnmr_metric_name(1e-3)
    with tracked_run(kind="recalibrate", run_name="race"):
        versions = [
            str(register_scorer(make_calibration(0.05 + i / 100, 0.12), model_name=name).version)
            for i in range(3)
        ]
        first, second, challenger = versions
        set_alias(name, CHAMPION, first)
        calls = []

        def evaluate_while_another_run_promotes(version) -> dict[str, float]:
            # Every time the gate reads the champion, a concurrent run moves the alias.
            calls.append(str(version.version))
            set_alias(name, CHAMPION, second if str(version.version) == first else first)
            return {key: 0.5}

        with pytest.raises(RuntimeError) as err:
            promote_if_better(
                name, challenger, {key: 0.01}, evaluate_while_another_run_promotes, GateConfig()
            )
    assert str(err.value) == (
        f"the {name}@champion alias kept moving during {MAX_ATTEMPTS} gate attempts although "
        "the promotion lock was held: something moves it without the lock"
    )
    assert len(calls) == MAX_ATTEMPTS == 5
    assert str(alias_version(name, CHAMPION).version) != challenger  # never took the alias


# ----------------------------------------------------------------------------- resources, GPU


@pytest.mark.ray
def test_wait_for_resources_warns_instead_of_refusing(
    ray_cluster: None, caplog: pytest.LogCaptureFixture
) -> None:
    from qmag_ray.embedding import EmbedConfig, EmbedError
    from qmag_ray.embedding.pipeline import check_resources

    common = dict(images="unused", model="unused", arch="iresnet-demo", output="unused", actors=3)
    with pytest.raises(EmbedError) as err:
        check_resources(EmbedConfig(**common))
    assert "need 4 CPUs but the Ray cluster has 2" in str(err.value)
    assert "pass --wait-for-resources" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="qmag_ray"):
        check_resources(EmbedConfig(**common, wait_for_resources=True))  # returns, no error
    warned = [r.getMessage() for r in caplog.records]
    assert any(
        "need 4 CPUs but the Ray cluster has 2" in m and "waiting for the autoscaler" in m
        for m in warned
    ), warned
    # GPUs that are not there are waited for the same way.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qmag_ray"):
        check_resources(
            EmbedConfig(**{**common, "actors": 1}, gpus_per_actor=1.0, wait_for_resources=True)
        )
    assert any("need 1 GPUs but the Ray cluster has 0" in r.getMessage() for r in caplog.records)


def test_gpu_only_options_on_a_machine_without_a_gpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--mixed-precision and --channels-last with a GPU that is not there: the actor warns,
    runs on the CPU in float32, and gives the plain model's embeddings."""
    if torch.cuda.is_available():
        pytest.fail("this test describes a machine without CUDA")
    from qmag_ray.embedding.actor import EmbedActor
    from qmag_ray.model import create_backbone, save_checkpoint

    torch.manual_seed(0)
    model = create_backbone("iresnet-demo").eval()
    ckpt = tmp_path / "demo.pth"
    save_checkpoint(model, str(ckpt), arch="iresnet-demo")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    batch = {
        "index": np.arange(3),
        "image": images,
        "error": np.array(["", "", ""], dtype=object),
        "resized_from": np.array([None] * 3, dtype=object),
    }
    with caplog.at_level(logging.WARNING):
        actor = EmbedActor(
            str(ckpt), "iresnet-demo", use_gpu=True, mixed_precision=True, channels_last=True
        )
    assert any("torch sees no CUDA device; using the CPU" in r.getMessage() for r in caplog.records)
    assert actor.device.type == "cpu" and actor.autocast is False
    out = actor(batch)
    assert out["embedding"].dtype == np.float32
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0))
    with torch.inference_mode():
        want = model(x).numpy()
    np.testing.assert_allclose(out["embedding"], want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the demo command


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_demo_command_end_to_end_on_a_small_set(ray_cluster: None, tmp_path: Path) -> None:
    """`qmag-ray demo` on 40 identities x 4 images: every step runs and leaves its files."""
    from typer.testing import CliRunner

    from qmag_ray.cli import app

    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--identities", "40", "--images-per-identity", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for step in range(1, 5):
        assert f"[{step}/4] " in result.output
    summary = json.loads((out / "embeddings" / "summary.json").read_text())
    assert summary["counts"]["inputs"] == 160 and summary["counts"]["embedded"] == 160
    assert summary["arch"] == "iresnet-demo"
    (run,) = sorted((out / "calibration").glob("run-*"))  # a new folder per demo run
    cal = QMagFaceCalibration.from_file(str(run / "calibration.json"))
    assert cal.n_genuine > 0 and cal.n_impostor > 0
    assert "models:/qmagface@champion -> version 1" in result.output
    assert "quality check: Spearman(embedding norm, degradation) = -" in result.output
    # ... and the per-group report of the held-out identities (synth writes pose_band).
    assert "held-out identities, per-pose_band report at the global threshold" in result.output
    assert "per-group report skipped" not in result.output
    bands = [ln.split()[0] for ln in result.output.splitlines() if ln.split()[:1]]
    assert {"upright", "tilted", "strong"} & set(bands) and "max/min" in bands
    assert (out / "mlflow.db").is_file()
    # A second run reuses the images and the embeddings.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert f"reusing {out / 'images'}" in again.output
    assert f"reusing {out / 'embeddings'}" in again.output
    assert "models:/qmagface@champion -> version 2" in again.output
    # ... and keeps the earlier run, saying so.
    assert "keeping 1 earlier run(s)" in again.output
    assert (
        len(list((out / "calibration").glob("run-*"))) == 2 and (run / "calibration.json").is_file()
    )
