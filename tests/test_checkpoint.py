"""MagFace checkpoints: every layout round-trips exactly, bad files fail clearly, nothing runs."""

from __future__ import annotations

import builtins
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from qmag_ray import storage
from qmag_ray.model import (
    LAYOUTS,
    CheckpointError,
    IResNet,
    backbone_state_dict,
    create_backbone,
    describe_checkpoint,
    load_backbone,
    read_checkpoint,
    register_backbone,
    save_checkpoint,
    select_device,
)


def randomised(name: str, seed: int = 0, **kwargs: object) -> nn.Module:
    """A backbone whose every tensor (BN statistics and PReLU too) is random and matters."""
    torch.manual_seed(seed)
    model = create_backbone(name, **kwargs)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight")):
                tensor.uniform_(0.5, 1.5)
            elif key.endswith(("running_mean", ".bias")):
                tensor.normal_(0.0, 0.1)
            elif key.endswith("prelu.weight"):
                tensor.uniform_(0.0, 0.5)
            elif key.endswith("num_batches_tracked"):
                tensor.fill_(1234)
    return model.eval()


def embed(model: nn.Module, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 112, 112))
    assert torch.isfinite(out).all()
    return out


class Payload:
    """Pickles as a call to ``print``: loading it unsafely would execute that call."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.print, ("QMAG-PAYLOAD-EXECUTED",))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ["iresnet-demo", "iresnet18"])
def test_every_layout_loads_to_the_same_embeddings(tmp_path: Path, arch: str, layout: str) -> None:
    model = randomised(arch)
    uri = str(tmp_path / "magface_epoch_00025.pth")
    save_checkpoint(model, uri, arch, layout=layout, epoch=25)

    raw = read_checkpoint(uri)
    assert set(raw) == {"epoch", "arch", "state_dict", "optimizer"}
    assert raw["epoch"] == 25 and raw["arch"] == arch
    assert f"{layout}features.weight" in raw["state_dict"]
    assert all(key.startswith(layout) for key in raw["state_dict"])

    loaded = load_backbone(uri, arch)
    assert not loaded.training
    assert torch.equal(embed(loaded), embed(model))
    assert all(p.requires_grad and p.dtype == torch.float32 for p in loaded.parameters())
    assert int(loaded.features.num_batches_tracked) == 1234
    # The comparison can fail: a differently initialised network gives other embeddings.
    assert not torch.allclose(embed(randomised(arch, seed=7)), embed(model))
    Path(uri).unlink()  # iResNet-18 files are ~96 MB; pytest keeps tmp dirs of recent runs


@pytest.mark.parametrize(
    ("layout", "head_key"),
    [("features.module.", "fc.weight"), ("module.features.", "module.fc.weight")],
)
def test_the_margin_head_is_dropped(tmp_path: Path, layout: str, head_key: str) -> None:
    model = randomised("iresnet-demo")
    uri = str(tmp_path / "with_head.pth")
    head = {head_key: torch.randn(model.embedding_size, 1000)}
    save_checkpoint(model, uri, "iresnet-demo", layout=layout, extra_state=head)

    state = backbone_state_dict(read_checkpoint(uri))
    assert set(state) == set(model.state_dict())
    assert state["fc.weight"].shape == model.fc.weight.shape  # the backbone's own fc
    assert torch.equal(embed(load_backbone(uri, "iresnet-demo")), embed(model))
    info = describe_checkpoint(uri, "iresnet-demo")
    assert info["dropped_keys"] == [head_key] and info["layout"] == layout


def test_the_dropped_keys_line_counts_them_in_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a load logs about the keys it leaves out: ``1 ... key``, ``2 ... keys``, none."""
    model = randomised("iresnet-demo")
    heads = {
        "one.pth": {"fc.weight": torch.zeros(2, 2)},
        "two.pth": {"fc.weight": torch.zeros(2, 2), "optimizer_state": torch.zeros(1)},
        "none.pth": {},
    }
    lines = {}
    for name, head in heads.items():
        uri = str(tmp_path / name)
        save_checkpoint(model, uri, "iresnet-demo", extra_state=head)
        caplog.clear()
        with caplog.at_level("INFO", logger="qmag_ray.model.checkpoint"):
            load_backbone(uri, "iresnet-demo")
        lines[name] = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert lines["one.pth"] == [f"{tmp_path / 'one.pth'}: left out 1 non-backbone key: fc.weight"]
    assert lines["two.pth"] == [
        f"{tmp_path / 'two.pth'}: left out 2 non-backbone keys: fc.weight, optimizer_state"
    ]
    assert lines["none.pth"] == []


def test_a_bare_state_dict_loads(tmp_path: Path) -> None:
    model = randomised("iresnet-demo")
    for name, state in {
        "bare.pth": model.state_dict(),
        "dp.pth": {f"module.{k}": v for k, v in model.state_dict().items()},
    }.items():
        buffer = io.BytesIO()
        torch.save(state, buffer)
        storage.write_bytes(str(tmp_path / name), buffer.getvalue())
        assert torch.equal(embed(load_backbone(str(tmp_path / name), "iResNet-Demo")), embed(model))


def test_half_precision_weights_load_into_a_float32_model(tmp_path: Path) -> None:
    model = randomised("iresnet-demo")
    uri = str(tmp_path / "half.pth")
    save_checkpoint(model.half(), uri, "iresnet-demo")
    loaded = load_backbone(uri, "iresnet-demo")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.allclose(embed(loaded), embed(model.float()), rtol=0.05, atol=0.05)


def test_a_wrong_arch_names_the_arch_the_missing_keys_and_the_fitting_arch(
    tmp_path: Path,
) -> None:
    uri = str(tmp_path / "r18.pth")
    save_checkpoint(create_backbone("iresnet18"), uri, "iresnet18")
    with pytest.raises(CheckpointError) as info:
        load_backbone(uri, "iresnet50")
    message = str(info.value)
    assert "'iresnet50'" in message
    assert "layer1.2.bn1.weight" in message  # iResNet-50 has a third block in stage 1
    assert "missing keys" in message and "0 unexpected keys" in message
    assert "in total" in message  # long lists are shortened
    assert "pass arch='iresnet18'" in message
    assert "'arch' entry says 'iresnet18'" in message
    with pytest.raises(CheckpointError, match="iresnet50"):
        describe_checkpoint(uri, "iresnet50")
    Path(uri).unlink()


def test_unexpected_keys_and_shape_mismatches_are_named(tmp_path: Path) -> None:
    register_backbone("test-deep-demo")(
        lambda **kw: IResNet((2, 1, 1, 1), widths=(8, 16, 32, 64), embedding_size=128, **kw)
    )
    deep = str(tmp_path / "deep.pth")
    save_checkpoint(randomised("test-deep-demo"), deep, "test-deep-demo")
    with pytest.raises(CheckpointError) as info:
        load_backbone(deep, "iresnet-demo")
    message = str(info.value)
    assert "unexpected keys" in message and "layer1.1.conv1.weight" in message
    assert "0 missing keys" in message and "pass arch='test-deep-demo'" in message

    narrow = str(tmp_path / "emb64.pth")
    save_checkpoint(randomised("iresnet-demo", embedding_size=64), narrow, "iresnet-demo")
    with pytest.raises(CheckpointError) as info:
        load_backbone(narrow, "iresnet-demo")
    assert "fc.weight (64, 3136) vs (128, 3136)" in str(info.value)
    loaded = load_backbone(narrow, "iresnet-demo", embedding_size=64)
    assert loaded.embedding_size == 64


def test_a_truncated_file_fails_clearly(tmp_path: Path) -> None:
    whole = str(tmp_path / "whole.pth")
    save_checkpoint(randomised("iresnet-demo"), whole, "iresnet-demo")
    data = storage.read_bytes(whole)
    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint") as info:
        load_backbone(str(half), "iresnet-demo")
    assert str(half) in str(info.value)


def test_an_empty_or_garbage_file_fails_clearly(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.*truncated or not a torch checkpoint"):
        read_checkpoint(str(empty))
    garbage = tmp_path / "notes.pth"
    garbage.write_text("these are not weights\n" * 20)
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_checkpoint(str(garbage))


def test_a_missing_file_names_the_uri(tmp_path: Path) -> None:
    uri = str(tmp_path / "nowhere" / "magface_epoch_00025.pth")
    with pytest.raises(CheckpointError, match="not found") as info:
        load_backbone(uri, "iresnet100")
    assert uri in str(info.value)


def test_a_file_that_needs_code_execution_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    model = randomised("iresnet-demo")
    state = {f"features.module.{k}": v for k, v in model.state_dict().items()}
    armed = {"epoch": 1, "arch": "iresnet-demo", "state_dict": state, "hook": Payload()}
    uri = tmp_path / "armed.pth"
    torch.save(armed, uri)

    with pytest.raises(CheckpointError, match="refused.*execute code.*print"):
        load_backbone(str(uri), "iresnet-demo")
    with pytest.raises(CheckpointError, match="refused"):
        describe_checkpoint(str(uri), "iresnet-demo")
    assert "QMAG-PAYLOAD-EXECUTED" not in capfd.readouterr().out

    # Control: the payload is real, an unsafe load does run it.
    torch.load(uri, weights_only=False)
    assert "QMAG-PAYLOAD-EXECUTED" in capfd.readouterr().out


def test_a_pickled_module_is_refused(tmp_path: Path) -> None:
    uri = tmp_path / "whole_model.pth"
    torch.save(create_backbone("iresnet-demo"), uri)
    with pytest.raises(CheckpointError, match="refused.*IResNet"):
        read_checkpoint(str(uri))


def test_a_dict_without_a_backbone_is_rejected() -> None:
    with pytest.raises(CheckpointError, match="no iResNet backbone"):
        backbone_state_dict({"epoch": 3, "state_dict": {"encoder.weight": torch.zeros(2)}})


def test_save_checkpoint_rejects_unknown_layouts_and_arches(tmp_path: Path) -> None:
    model = create_backbone("iresnet-demo")
    with pytest.raises(ValueError, match="layout"):
        save_checkpoint(model, str(tmp_path / "x.pth"), "iresnet-demo", layout="backbone.")
    with pytest.raises(ValueError, match="unknown backbone"):
        save_checkpoint(model, str(tmp_path / "x.pth"), "resnet50")
    assert not (tmp_path / "x.pth").exists()


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


@pytest.mark.s3
def test_load_from_s3(s3_bucket: str) -> None:
    model = randomised("iresnet-demo")
    uri = f"{s3_bucket}/models/magface_epoch_00025.pth"
    save_checkpoint(model, uri, "iresnet-demo", epoch=25)
    assert torch.equal(embed(load_backbone(uri, "iresnet-demo")), embed(model))
    info = describe_checkpoint(uri, "iresnet-demo")
    assert info["sha256"] == storage.sha256(uri) and info["epoch"] == 25
    assert info["uri"] == uri and info["layout"] == "features.module."
    with pytest.raises(CheckpointError, match="not found") as missing:
        load_backbone(f"{s3_bucket}/models/other.pth", "iresnet-demo")
    assert f"{s3_bucket}/models/other.pth" in str(missing.value)
