"""Recalibration end to end: real local Ray, a real SQLite MLflow store, real images and model.

One test drives four runs (each costs Ray Data and calibration start-ups): the first embeds
everything and becomes champion, the second (through the CLI and a YAML config) sees unchanged
data and registers nothing, the third embeds only the new identities and passes a gate that
allows any FNMR rise, the fourth fits the same data again (only a setting that does not touch
the fit changed) and must fail a gate that requires an improvement. Each gate outcome follows
from the construction, not from the figures.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow_fixtures import free_port, tracking_at
from typer.testing import CliRunner
from workflow_data import synthetic_table, write_table

from qmag_ray.config import ConfigError, load_config
from qmag_ray.embedding import EmbedConfig, run_embed
from qmag_ray.embeddings import load_embeddings
from qmag_ray.model import create_backbone, save_checkpoint
from qmag_ray.synth import SynthSpec, write_dataset
from qmag_ray.workflows.recalibrate_config import RecalibrateConfig

DIM_ARCH = "iresnet-demo"


def base_config(tmp: Path, tracking: str) -> dict:
    return {
        "images": str(tmp / "images"),
        "embeddings": str(tmp / "embeddings"),
        "model": str(tmp / "demo.pth"),
        "arch": DIM_ARCH,
        "output": str(tmp / "runs"),
        "holdout": {"embeddings": str(tmp / "holdout_emb"), "pairs": str(tmp / "holdout.csv")},
        "register_as": "qmagface",
        "gate": {"target_fmr": 1e-2, "max_fnmr_increase": 0.0},
        "grid": {"n_fmr": 5, "fmr_min": 1e-2, "fmr_max": 1e-1, "n_weights": 5},
        "validation": {"mode": "none"},
        "embed": {"batch_size": 16},
        "tracking": {"tracking_uri": tracking, "experiment": "recal-test"},
    }


def holdout_pairs(table_uri: str, out: Path) -> None:
    """Every pair of the held-out images, labelled by identity (a, b, label CSV)."""
    table = load_embeddings(table_uri)
    rows = [
        (table.path[i], table.path[j], int(table.identity[i] == table.identity[j]))
        for i, j in itertools.combinations(range(len(table)), 2)
    ]
    pd.DataFrame(rows, columns=["a", "b", "label"]).to_csv(out, index=False)


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, "sqlite:///x.db")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**cfg, "pair_mode": "listed"}))
    with pytest.raises(
        ConfigError, match=r"pair_mode \(--pair-mode\) must be generate or exhaustive"
    ):
        load_config(RecalibrateConfig, str(path))
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "holdout"}))
    with pytest.raises(ConfigError, match="section holdout is required"):
        load_config(RecalibrateConfig, str(path))
    path.write_text(yaml.safe_dump({**cfg, "gate": {"tolerance": 1}}))
    with pytest.raises(ConfigError, match=r"unknown setting gate.tolerance .*did you mean"):
        load_config(RecalibrateConfig, str(path))


def test_unreachable_tracking_fails_before_any_work(tmp_path: Path) -> None:
    from qmag_ray.cli import app

    tmp_path.joinpath("images").mkdir()
    tmp_path.joinpath("demo.pth").write_bytes(b"not used")
    write_table(synthetic_table(4, 2, 8), tmp_path / "holdout_emb")  # a real (tiny) one
    rows = "".join(f"x{i}.jpg,y{i}.jpg,0\n" for i in range(100))  # measures the gate's 1e-2
    tmp_path.joinpath("holdout.csv").write_text("a,b,label\n" + rows)
    uri = f"http://user:pw-secret@127.0.0.1:{free_port()}"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, uri)))
    result = CliRunner().invoke(app, ["recalibrate", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "127.0.0.1" in result.output and "not reachable" in result.output
    assert "pw-secret" not in result.output
    assert not (tmp_path / "embeddings").exists() and not (tmp_path / "runs").exists()


def test_a_gate_fmr_the_holdout_cannot_measure_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    from qmag_ray.cli import app

    tmp_path.joinpath("images").mkdir()
    tmp_path.joinpath("demo.pth").write_bytes(b"not used")
    write_table(synthetic_table(4, 2, 8), tmp_path / "holdout_emb")  # a real (tiny) one
    # 30 genuine + 270 impostor pairs: the smallest FMR they measure is 1/270 = 0.0037.
    rows = [f"g{i}a.jpg,g{i}b.jpg,1" for i in range(30)]
    rows += [f"x{i}.jpg,y{i}.jpg,0" for i in range(270)]
    tmp_path.joinpath("holdout.csv").write_text("a,b,label\n" + "\n".join(rows) + "\n")
    cfg = base_config(tmp_path, f"http://127.0.0.1:{free_port()}")  # never reached
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["recalibrate", "--config", str(path), "--target-fmr", "1e-3"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) <= 2, result.output
    assert "--target-fmr (gate.target_fmr) 0.001 cannot be measured" in result.output
    assert "270 impostor pairs measure no FMR below 0.0037" in result.output
    assert str(tmp_path / "holdout.csv") in result.output
    assert not (tmp_path / "embeddings").exists() and not (tmp_path / "runs").exists()


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_four_recalibrations_with_known_gate_outcomes(ray_cluster: None, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    from qmag_ray.cli import app
    from qmag_ray.tracking.registry import CHALLENGER, CHAMPION, alias_version
    from qmag_ray.workflows.recalibrate import TAG_INPUTS, run_recalibration

    torch.manual_seed(0)
    save_checkpoint(create_backbone(DIM_ARCH).eval(), str(tmp_path / "demo.pth"), DIM_ARCH)
    write_dataset(str(tmp_path / "images"), SynthSpec(identities=12, images_per_identity=5))
    write_dataset(
        str(tmp_path / "holdout_img"),
        SynthSpec(identities=10, images_per_identity=5, first_identity=500),
    )
    run_embed(
        EmbedConfig(
            images=str(tmp_path / "holdout_img"),
            model=str(tmp_path / "demo.pth"),
            arch=DIM_ARCH,
            output=str(tmp_path / "holdout_emb"),
            batch_size=16,
        )
    )
    holdout_pairs(str(tmp_path / "holdout_emb"), tmp_path / "holdout.csv")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = base_config(tmp_path, tracking)
    config_path = tmp_path / "recalibrate.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(RecalibrateConfig, str(config_path))

    with tracking_at(tracking):
        # 1. Everything is new; with no champion the version passing the gate becomes champion.
        first = run_recalibration(cfg)
        assert first.status == "registered" and first.version == "1"
        assert first.embed.embedded_this_run == 60 and first.embed.skipped_existing == 0
        assert first.promotion is not None and first.promotion.promoted
        assert str(alias_version("qmagface", CHAMPION).version) == "1"
        assert str(alias_version("qmagface", CHALLENGER).version) == "1"
        run = mlflow.get_run(first.run_id)
        assert run.data.tags["gate.promote"] == "true"
        assert run.data.tags[TAG_INPUTS] == first.fingerprint
        assert "challenger.qmagface.fnmr_at_fmr_1e-02" in run.data.metrics
        assert run.data.metrics["embed.embedded_this_run"] == 60
        artifacts = {f.path for f in MlflowClient().list_artifacts(first.run_id)}
        assert {"calibration", "holdout", "decision.json"} <= artifacts

    # 2. Unchanged data, through the CLI and the YAML config: nothing new is registered.
    result = CliRunner().invoke(app, ["recalibrate", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    assert "nothing new registered" in result.output and "0 new image(s)" in result.output
    with tracking_at(tracking):
        versions = MlflowClient().search_model_versions("name = 'qmagface'")
        assert len(versions) == 1

        # 3. Four new identities: only their 20 images are embedded; a new version is judged.
        write_dataset(
            str(tmp_path / "images"),
            SynthSpec(identities=4, images_per_identity=5, first_identity=12),
        )
        # The gate allows an FNMR rise of 1 (FNMR is a fraction): it must promote.
        permissive = load_config(RecalibrateConfig, str(config_path), {"gate.max_fnmr_increase": 1})
        third = run_recalibration(permissive)
        assert third.embed.embedded_this_run == 20 and third.embed.skipped_existing == 60
        assert third.status == "registered" and third.version == "2"
        assert third.fingerprint != first.fingerprint
        promotion = third.promotion
        assert promotion is not None and promotion.previous_champion == "1"
        assert promotion.promoted is True and promotion.champion_version == "2"
        assert str(alias_version("qmagface", CHAMPION).version) == "2"
        assert str(alias_version("qmagface", CHALLENGER).version) == "2"
        key = "qmagface.fnmr_at_fmr_1e-02"
        new, old = third.challenger_metrics[key], promotion.champion_metrics[key]
        assert np.isfinite(new) and np.isfinite(old)
        assert any(
            r.startswith(f"PASS: {key} challenger") and r.endswith("(allowed increase 1)")
            for r in promotion.decision.reasons
        ), promotion.decision.reasons
        tags = MlflowClient().get_model_version("qmagface", "2").tags
        assert tags["gate.promote"] == "true"
        assert tags["gate.champion_version"] == "1" and tags[TAG_INPUTS] == third.fingerprint
        metrics = mlflow.get_run(third.run_id).data.metrics
        assert metrics[f"champion_v1.{key}"] == old and metrics[f"challenger.{key}"] == new

        # 4. The same data again; only the guard tolerance changed, which the fit never reads
        # (validation mode none), so the fingerprint differs but the fitted scorer is the same:
        # the challenger's FNMR equals the champion's, and a gate that requires a strict
        # improvement must keep the champion.
        strict = load_config(
            RecalibrateConfig,
            str(config_path),
            {
                "validation.tolerance": 0.06,
                "gate.max_fnmr_increase": 1,
                "gate.require_improvement": True,
            },
        )
        fourth = run_recalibration(strict)
        assert fourth.embed.embedded_this_run == 0 and fourth.embed.skipped_existing == 80
        assert fourth.status == "registered" and fourth.version == "3"
        assert fourth.fingerprint not in (first.fingerprint, third.fingerprint)
        assert fourth.challenger_metrics == third.challenger_metrics  # the same scorer
        kept = fourth.promotion
        assert kept is not None and kept.promoted is False
        assert kept.previous_champion == kept.champion_version == "2"
        assert kept.champion_metrics[key] == fourth.challenger_metrics[key]
        assert f"FAIL: improvement required, {key} did not improve" in kept.decision.reasons
        assert str(alias_version("qmagface", CHAMPION).version) == "2"
        assert str(alias_version("qmagface", CHALLENGER).version) == "3"
        assert MlflowClient().get_model_version("qmagface", "3").tags["gate.promote"] == "false"
        decision = fourth.to_dict()
        assert decision["promotion"]["promoted"] is False and decision["version"] == "3"
