"""MagFace training: data listing, loss decreasing on a separable toy set, a real Ray Train run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from qmag_ray.model import load_backbone, read_checkpoint
from qmag_ray.training.config import TrainConfig
from qmag_ray.training.data import (
    FaceDataset,
    TrainingDataError,
    collate,
    list_labelled_images,
)
from qmag_ray.training.loop import (
    build_net,
    lr_factor,
    make_optimizer,
    progress_line,
    train_step,
)


def _toy_tree(root, identities: int = 4, images: int = 6, seed: int = 0) -> None:
    """Trivially separable identities: a bright block in a different place for each."""
    rng = np.random.default_rng(seed)
    for k in range(identities):
        folder = root / f"person{k}"
        folder.mkdir(parents=True)
        for n in range(images):
            img = rng.integers(0, 60, (112, 112, 3), dtype=np.uint8)
            row, col = divmod(k, 2)
            img[row * 56 : row * 56 + 56, col * 56 : col * 56 + 56, k % 3] = 230
            Image.fromarray(img).save(folder / f"{n}.png")


def test_list_labelled_images_from_tree_manifest_and_errors(tmp_path) -> None:
    _toy_tree(tmp_path / "tree", identities=3, images=2)
    (tmp_path / "tree" / "notes.txt").write_text("not an image")
    tree = list_labelled_images(str(tmp_path / "tree"))
    assert tree.classes == ["person0", "person1", "person2"] and len(tree) == 6
    assert sorted(tree.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    manifest = pd.DataFrame({"path": tree.paths, "identity": [f"x{i}" for i in tree.labels]})
    manifest.to_parquet(tmp_path / "tree" / "manifest.parquet")
    via_folder = list_labelled_images(str(tmp_path / "tree"))
    assert via_folder.classes == ["x0", "x1", "x2"]
    via_file = list_labelled_images(str(tmp_path / "tree" / "manifest.parquet"))
    assert via_file.paths == tree.paths and via_file.root == via_folder.root
    manifest.assign(identity="same").to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(TrainingDataError, match="at least 2 identities"):
        list_labelled_images(str(tmp_path / "one.csv"))
    manifest.drop(columns="identity").to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(TrainingDataError, match="no identity"):
        list_labelled_images(str(tmp_path / "none.csv"))
    with pytest.raises(TrainingDataError, match="not found"):
        list_labelled_images(str(tmp_path / "missing"))


def test_dataset_matches_embedding_preprocessing_and_skips_bad_files(tmp_path) -> None:
    _toy_tree(tmp_path / "tree", identities=2, images=2)
    (tmp_path / "tree" / "person1" / "9.png").write_bytes(b"broken")
    images = list_labelled_images(str(tmp_path / "tree"))
    ds = FaceDataset(images)
    x, label = ds[0]
    rgb = np.asarray(Image.open(tmp_path / "tree" / images.paths[0]).convert("RGB"))
    expected = rgb[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255  # BGR, /255, CHW
    assert torch.equal(x, torch.from_numpy(expected)) and label == images.labels[0]
    bad = images.paths.index("person1/9.png")
    assert ds[bad] is None
    xb, yb, skipped = collate([ds[0], ds[bad], ds[1]])
    assert xb.shape == (2, 3, 112, 112) and yb.tolist() == [0, 0] and skipped == 1


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    values = [lr_factor(s, 10, 110) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))
    assert values[110] == pytest.approx(0.0)


def test_progress_line_names_the_step_of_the_total_and_the_window_means() -> None:
    metrics = {"step": 50.0, "epoch": 2.0, "loss": 21.3847, "acc": 0.7291, "norm": 16.44}
    metrics["images_per_s"] = 61.6
    line = progress_line(metrics, 1500)
    assert line == (
        "step 50/1500 (epoch 2): loss 21.385, accuracy 0.729, mean norm 16.4, 62 images/s"
    )


def test_loss_decreases_on_a_separable_toy_set(tmp_path) -> None:
    _toy_tree(tmp_path / "tree")
    cfg = TrainConfig(data=str(tmp_path / "tree"), output=str(tmp_path / "out"), warmup_steps=0)
    torch.manual_seed(0)
    images = list_labelled_images(cfg.data)
    net = build_net(cfg, images.num_classes)
    optimizer = make_optimizer(cfg, net.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loader = DataLoader(FaceDataset(images), batch_size=24, shuffle=True, collate_fn=collate)
    history = []
    for _ in range(12):
        for x, y, _skipped in loader:
            history.append(train_step(net, optimizer, scheduler, x, y))
    losses = [h["loss"] for h in history]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert history[-1]["acc"] == 1.0


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_ray_train_run_writes_magface_checkpoints_and_fine_tunes(
    ray_cluster: None, tmp_path
) -> None:
    from qmag_ray.synth import SynthSpec, write_dataset
    from qmag_ray.training.trainer import train

    data = str(tmp_path / "synth")
    write_dataset(data, SynthSpec(identities=5, images_per_identity=4, seed=3))
    out = tmp_path / "run1"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(
        __import__("qmag_ray.cli", fromlist=["app"]).app,
        [
            "train",
            "--data",
            data,
            "--output",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--max-steps",
            "3",
            "--log-every",
            "1",
            "--warmup-steps",
            "1",
            "--tracking-uri",
            tracking,
            "--experiment",
            "toy",
        ],
    )
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history["history"]] == [1, 2, 3]
    checkpoint = history["checkpoint"]
    assert checkpoint.endswith("magface_epoch_00002.pth")
    raw = read_checkpoint(checkpoint)
    assert raw["arch"] == "iresnet-demo" and raw["epoch"] == 2
    assert "features.module.features.weight" in raw["state_dict"]
    assert tuple(raw["state_dict"]["fc.weight"].shape) == (128, 5)  # the margin head
    model = load_backbone(checkpoint, "iresnet-demo")
    emb = model(torch.rand(2, 3, 112, 112))
    assert emb.shape == (2, 128) and torch.isfinite(emb).all()

    import mlflow

    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["toy"])
    assert len(runs) == 1 and runs["params.arch"][0] == "iresnet-demo"
    loss_curve = mlflow.MlflowClient().get_metric_history(runs["run_id"][0], "train_loss")
    assert [m.step for m in loss_curve] == [1, 2, 3]

    tuned = train(
        TrainConfig(
            data=data,
            output=str(tmp_path / "run2"),
            epochs=1,
            batch_size=8,
            max_steps=2,
            log_every=1,
            init_checkpoint=checkpoint,
            lr=1e-3,
        )
    )
    state = read_checkpoint(tuned.checkpoint)["state_dict"]
    start = raw["state_dict"]["features.module.conv1.weight"]
    assert state["features.module.conv1.weight"].shape == start.shape
    assert not torch.equal(state["features.module.conv1.weight"], start)  # it trained
    # the head was restored, then trained a little: close to the first run's, not random
    cos = torch.nn.functional.cosine_similarity(
        state["fc.weight"], raw["state_dict"]["fc.weight"], 0
    )
    assert cos.min() > 0.9


def test_heldout_report_on_a_small_synthetic_set(tmp_path) -> None:
    from qmag_ray.model import create_backbone, save_checkpoint
    from qmag_ray.synth import SynthSpec, write_dataset
    from qmag_ray.training.heldout import heldout_report

    data = str(tmp_path / "set")
    write_dataset(data, SynthSpec(identities=6, images_per_identity=5, seed=4))
    torch.manual_seed(0)
    save_checkpoint(create_backbone("iresnet-demo"), str(tmp_path / "m.pth"), "iresnet-demo")
    report = heldout_report(
        str(tmp_path / "m.pth"),
        data,
        fmrs=(0.1,),
        calibration_impostor_fraction=1.0,
        fmr_range=(0.2, 0.5),
    )
    assert report["test_genuine"] == 3 * 10 and report["test_impostor"] == 15 * 14 // 2 - 30
    # The same figures from the oracles: the spec's forward and input, plain pairs and ROC.
    from model_oracle import backbone_from_checkpoint, iresnet_forward, magface_input
    from oracle import oracle_fnmr_at_fmr
    from scipy.stats import spearmanr

    manifest = pd.read_parquet(tmp_path / "set" / "manifest.parquet")
    x = np.stack([magface_input((tmp_path / "set" / p).read_bytes()) for p in manifest["path"]])
    with torch.no_grad():
        emb = iresnet_forward(
            backbone_from_checkpoint(str(tmp_path / "m.pth")), torch.from_numpy(x)
        )
    emb = emb.double().numpy()
    ident = manifest["identity"].to_numpy()
    test = np.isin(ident, np.unique(ident)[3:])  # the second half of the sorted identities
    norm = np.linalg.norm(emb, axis=1)
    want_rho = spearmanr(norm[test], manifest["degradation"].to_numpy()[test])[0]
    assert report["spearman_norm_degradation"] == pytest.approx(want_rho, abs=1e-9)
    i, j = np.triu_indices(int(test.sum()), 1)
    e, n = emb[test], norm[test]
    cos = (e[i] * e[j]).sum(1) / (n[i] * n[j])
    q = np.minimum(n[i], n[j])
    y = (ident[test][i] == ident[test][j]).astype(int)
    qmag = np.minimum(0.0, report["beta"] * cos - report["alpha"]) * q + cos
    got = report["fnmr"]["0.1"]
    assert got["cosine"] == pytest.approx(oracle_fnmr_at_fmr(cos, y, [0.1])[0], abs=1e-12)
    assert got["qmagface"] == pytest.approx(oracle_fnmr_at_fmr(qmag, y, [0.1])[0], abs=1e-12)
