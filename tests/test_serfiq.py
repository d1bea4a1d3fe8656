"""SER-FIQ: the actor's quality against an independent numpy reference on the same fixed
dropout masks, its determinism (batch size, order, actors), the dropout types and the embed
job's ``serfiq`` column."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qmag_ray.embedding import EmbedConfig, run_embed
from qmag_ray.embedding.actor import EmbedActor
from qmag_ray.embeddings import load_embeddings
from qmag_ray.model import create_backbone, save_checkpoint
from qmag_ray.quality.columns import with_quality
from qmag_ray.quality.serfiq import SerfiqSettings, image_key, keep_masks


def random_bn_model(seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_backbone("iresnet-demo", **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return model.eval()


def reference_serfiq(trunk, masks, p, bn2, fc_w, fc_b, bn1, per_channel):
    """SER-FIQ written plainly from the paper (numpy only, nothing from qmag_ray).

    trunk: (C, H, W) trunk output of one image; masks: (m, units) bools, units = C (channel
    dropout) or C*H*W (element dropout); bn2/bn1: (mean, var, weight, bias, eps).
    """
    mean, var, w, b, eps = bn2
    x = (trunk - mean[:, None, None]) / np.sqrt(var[:, None, None] + eps) * w[:, None, None]
    x = x + b[:, None, None]
    m = len(masks)
    embeddings = []
    for k in range(m):
        keep = masks[k]
        if per_channel:
            keep = np.repeat(keep[:, None], x.shape[1] * x.shape[2], axis=1)
        v = (x.reshape(-1) * keep.reshape(-1)) / (1.0 - p)
        e = fc_w @ v + fc_b
        mean1, var1, w1, b1, eps1 = bn1
        e = (e - mean1) / np.sqrt(var1 + eps1) * w1 + b1
        embeddings.append(e / np.linalg.norm(e))
    total = 0.0
    for i in range(m):
        for j in range(i + 1, m):
            total += np.linalg.norm(embeddings[i] - embeddings[j])
    return 2.0 / (1.0 + math.exp(2.0 / (m * m) * total))


def _bn(module):
    return tuple(
        t.detach().double().numpy()
        for t in (module.running_mean, module.running_var, module.weight, module.bias)
    ) + (module.eps,)


def _batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "index": np.arange(n, dtype=np.int64),
        "path": np.array([f"id{i % 3}/{i}.jpg" for i in range(n)], dtype=object),
        "image": rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8),
        "error": np.array([""] * n, dtype=object),
        "resized_from": np.array([""] * n, dtype=object),
    }


@pytest.mark.parametrize("dropout_type", ["element", "channel"])
def test_actor_serfiq_equals_an_independent_reference(tmp_path: Path, dropout_type: str):
    model = random_bn_model(1, dropout_type=dropout_type)
    ckpt = str(tmp_path / "m.pth")
    save_checkpoint(model, ckpt, "iresnet-demo")
    settings = SerfiqSettings(passes=12, dropout=0.3, seed=7, dropout_type=dropout_type)
    actor = EmbedActor(ckpt, "iresnet-demo", serfiq=settings.to_dict())
    batch = _batch(3)
    out = actor(batch)
    plain = EmbedActor(ckpt, "iresnet-demo")(batch)
    np.testing.assert_allclose(out["embedding"], plain["embedding"], rtol=1e-5, atol=1e-5)
    from qmag_ray.images import to_input

    with torch.inference_mode():
        trunk = model.trunk(torch.from_numpy(to_input(batch["image"]))).double().numpy()
    fc_w = model.fc.weight.detach().double().numpy()
    fc_b = model.fc.bias.detach().double().numpy()
    per_channel = dropout_type == "channel"
    units = trunk.shape[1] if per_channel else int(np.prod(trunk.shape[1:]))
    for i, path in enumerate(batch["path"]):
        masks = keep_masks(image_key(7, path), 12, units, 0.3)
        expected = reference_serfiq(
            trunk[i], masks, 0.3, _bn(model.bn2), fc_w, fc_b, _bn(model.features), per_channel
        )
        assert out["serfiq"][i] == pytest.approx(expected, rel=1e-5)
        assert 0.0 < out["serfiq"][i] < 1.0


def test_masks_drop_at_the_rate_and_depend_on_seed_and_path():
    keep = keep_masks(image_key(0, "a/1.jpg"), 100, 1000, 0.4)
    assert keep.shape == (100, 1000) and abs(1 - keep.mean() - 0.4) < 0.01
    np.testing.assert_array_equal(keep, keep_masks(image_key(0, "a/1.jpg"), 100, 1000, 0.4))
    assert (keep != keep_masks(image_key(1, "a/1.jpg"), 100, 1000, 0.4)).any()
    assert (keep != keep_masks(image_key(0, "a/2.jpg"), 100, 1000, 0.4)).any()


def test_serfiq_is_the_same_whatever_the_batch_and_order(tmp_path: Path):
    ckpt = str(tmp_path / "m.pth")
    save_checkpoint(random_bn_model(2), ckpt, "iresnet-demo")
    actor = EmbedActor(ckpt, "iresnet-demo", serfiq=SerfiqSettings(20, 0.5, 3).to_dict())
    batch = _batch(7, seed=4)
    whole = actor(batch)["serfiq"]
    perm = np.array([6, 2, 0, 5])
    part = actor({k: v[perm] for k, v in batch.items()})["serfiq"]
    np.testing.assert_array_equal(part, whole[perm])
    batch["error"][1] = "broken"  # a failed row passes through, the others are unchanged
    mixed = actor(batch)["serfiq"]
    assert mixed[1] == 0.0
    np.testing.assert_array_equal(np.delete(mixed, 1), np.delete(whole, 1))
    other = EmbedActor(ckpt, "iresnet-demo", serfiq=SerfiqSettings(20, 0.5, 4).to_dict())
    assert (other(_batch(7, seed=4))["serfiq"] != whole).any()


def test_serfiq_settings_are_checked():
    with pytest.raises(ValueError, match="passes"):
        SerfiqSettings(passes=1)
    with pytest.raises(ValueError, match="dropout"):
        SerfiqSettings(dropout=1.0)
    with pytest.raises(ValueError, match="Input should be 'norm' or 'serfiq'"):
        EmbedConfig(images="i", model="m", arch="a", output="o", quality="ser")


@pytest.mark.ray
def test_embed_job_writes_a_serfiq_column_independent_of_batch_size(
    ray_cluster: None, tmp_path: Path
) -> None:
    from PIL import Image

    rng = np.random.default_rng(5)
    root = tmp_path / "images"
    for i in range(10):
        (root / f"p{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(
            root / f"p{i % 2}" / f"{i}.png"
        )
    ckpt = str(tmp_path / "m.pth")
    save_checkpoint(random_bn_model(3), ckpt, "iresnet-demo")
    values = []
    for batch_size in (3, 10):
        out = tmp_path / f"out{batch_size}"
        cfg = EmbedConfig(
            images=str(root),
            model=ckpt,
            arch="iresnet-demo",
            output=str(out),
            batch_size=batch_size,
            read_block_rows=batch_size,
            quality="serfiq",
            serfiq_passes=10,
            serfiq_seed=1,
        )
        summary = run_embed(cfg)
        assert summary.settings["serfiq"]["passes"] == 10
        table = load_embeddings(str(out))
        serfiq, info = with_quality(table, str(out), "serfiq")
        assert info.n_missing == 0 and len(serfiq) == 10
        order = np.argsort(serfiq.path)
        values.append(serfiq.quality[order])
        schema = pq.read_schema(next((out / "embeddings").rglob("part-*.parquet")))
        assert schema.names == ["path", "identity", "embedding", "quality", "serfiq"]
    np.testing.assert_array_equal(values[0], values[1])


def test_a_safetensors_checkpoint_loads_equal_to_the_torch_model(tmp_path: Path):
    from safetensors.torch import save_file

    from qmag_ray.model import CheckpointError, load_backbone

    model = random_bn_model(4)
    prefixed = {f"features.module.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(prefixed, str(tmp_path / "m.safetensors"))
    loaded = load_backbone(str(tmp_path / "m.safetensors"), "iresnet-demo")
    x = torch.rand(3, 3, 112, 112)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_backbone(str(tmp_path / "bad.safetensors"), "iresnet-demo")
