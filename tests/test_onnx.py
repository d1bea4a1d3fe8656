"""ONNX recognisers through onnxruntime in the embedding actor: equal to the torch model under
both named input conventions; their norm is refused as a quality unless asked for."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qmag_ray.embedding import EmbedConfig
from qmag_ray.embedding.actor import EmbedActor
from qmag_ray.embeddings import EmbeddingTable, write_embeddings
from qmag_ray.model import create_backbone
from qmag_ray.quality.columns import QualityColumnError, with_quality


def export(model: torch.nn.Module, path: Path) -> str:
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        torch.zeros(1, 3, 112, 112),
        buf,
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "n"}, "embedding": {0: "n"}},
        dynamo=False,
    )
    path.write_bytes(buf.getvalue())
    return str(path)


def _batch(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "index": np.arange(n, dtype=np.int64),
        "path": np.array([f"p/{i}.jpg" for i in range(n)], dtype=object),
        "image": rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8),  # BGR, as decoded
        "error": np.array([""] * n, dtype=object),
        "resized_from": np.array([""] * n, dtype=object),
    }


def test_onnx_actor_equals_the_torch_model_under_both_conventions(tmp_path: Path):
    torch.manual_seed(0)
    model = create_backbone("iresnet-demo").eval()
    onnx_file = export(model, tmp_path / "net.onnx")
    batch = _batch(4)
    bgr = batch["image"].astype(np.float32)  # N, H, W, C in BGR order
    # insightface: RGB, (pixel - 127.5) / 127.5, computed here from the raw pixels
    rgb = bgr[..., ::-1]
    x_if = torch.from_numpy(np.ascontiguousarray(((rgb - 127.5) / 127.5).transpose(0, 3, 1, 2)))
    # magface: BGR, pixel / 255
    x_mf = torch.from_numpy(np.ascontiguousarray((bgr / 255.0).transpose(0, 3, 1, 2)))
    for name, x in (("insightface", x_if), ("magface", x_mf)):
        actor = EmbedActor(onnx_file, "onnx", input_convention=name)
        with torch.inference_mode():
            expected = model(x).numpy()
        np.testing.assert_allclose(actor(batch)["embedding"], expected, rtol=1e-4, atol=1e-4)
        assert actor.onnx.providers[-1] == "CPUExecutionProvider"


def test_onnx_config_needs_a_convention_and_no_serfiq():
    with pytest.raises(ValueError, match="input_convention"):
        EmbedConfig(images="i", model="m.onnx", arch="onnx", output="o")
    with pytest.raises(ValueError, match="serfiq needs the network's head"):
        EmbedConfig(
            images="i",
            model="m.onnx",
            arch="onnx",
            output="o",
            input_convention="insightface",
            quality="serfiq",
        )
    with pytest.raises(ValueError, match="Input should be 'insightface' or 'magface'"):
        EmbedConfig(images="i", model="m.onnx", arch="onnx", output="o", input_convention="x")


def test_the_norm_of_a_model_not_magface_trained_is_refused_unless_asked(tmp_path: Path):
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(4, 8)).astype(np.float32)
    table = EmbeddingTable(
        np.array([f"p/{i}" for i in range(4)], object),
        np.array(["p"] * 4, object),
        vec,
        np.linalg.norm(vec, axis=1),
    )
    out = tmp_path / "emb"
    write_embeddings(table, str(out / "embeddings"))
    (out / "summary.json").write_text(
        json.dumps({"arch": "onnx", "settings": {"norm_is_quality": False}})
    )
    with pytest.raises(QualityColumnError, match="not MagFace-trained.*--norm-quality"):
        with_quality(table, str(out), "quality")
    same, _ = with_quality(table, str(out), "quality", allow_norm=True)
    assert same is table


# Execution providers: the GPU path's selection exercised on this CPU-only machine.
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def test_provider_selection_puts_cuda_first_on_a_gpu_actor_and_cpu_after_it():
    from qmag_ray.model.onnx import select_providers

    assert select_providers([CUDA_EP, CPU_EP], use_gpu=True) == [CUDA_EP, CPU_EP]
    assert select_providers(["TensorrtExecutionProvider", CUDA_EP, CPU_EP], True) == [
        CUDA_EP,
        CPU_EP,
    ]
    assert select_providers([CUDA_EP, CPU_EP], use_gpu=False) == [CPU_EP]
    assert select_providers([CPU_EP], use_gpu=False) == [CPU_EP]
    with pytest.raises(ValueError, match="no CUDAExecutionProvider .*onnxruntime-gpu.*--gpus-per"):
        select_providers([CPU_EP], use_gpu=True)


def test_a_session_that_dropped_cuda_is_refused():
    from qmag_ray.model.onnx import check_session_providers

    check_session_providers([CUDA_EP, CPU_EP], [CUDA_EP, CPU_EP])
    check_session_providers([CPU_EP], [CPU_EP])
    with pytest.raises(ValueError, match="could not start CUDAExecutionProvider .*runs on CPU"):
        check_session_providers([CUDA_EP, CPU_EP], [CPU_EP])


def test_gpu_actor_with_the_installed_onnxruntime(tmp_path: Path):
    """This machine's onnxruntime (CPU wheel): a GPU actor is refused with the fix named; on a
    machine with onnxruntime-gpu and a GPU the session runs CUDA first."""
    import onnxruntime as ort

    onnx_file = export(create_backbone("iresnet-demo").eval(), tmp_path / "net.onnx")
    if CUDA_EP in ort.get_available_providers():
        actor = EmbedActor(onnx_file, "onnx", use_gpu=True, input_convention="magface")
        assert actor.onnx.providers[:2] == [CUDA_EP, CPU_EP]
    else:
        with pytest.raises(ValueError, match="install onnxruntime-gpu"):
            EmbedActor(onnx_file, "onnx", use_gpu=True, input_convention="magface")


def test_cuda_requested_from_an_onnxruntime_without_it_falls_back_and_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The CUDA branch end to end on the CPU: onnxruntime is told CUDA exists (as
    onnxruntime-gpu says even when the CUDA libraries will not load), the session is asked
    for CUDA then CPU, starts on the CPU only (a real session with what such a host gets),
    and the backbone refuses it."""
    import onnxruntime as ort

    from qmag_ray.model.onnx import OnnxBackbone, convention

    onnx_file = export(create_backbone("iresnet-demo").eval(), tmp_path / "net.onnx")
    asked: list[list[str]] = []
    real_session = ort.InferenceSession

    def session(model, sess_options=None, providers=None):  # noqa: ANN001, ANN202
        asked.append(list(providers))
        return real_session(model, sess_options=sess_options, providers=[CPU_EP])

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(ValueError, match="could not start CUDAExecutionProvider"):
        OnnxBackbone(onnx_file, convention("magface"), use_gpu=True)
    assert asked == [[CUDA_EP, CPU_EP]]
    # the same model on a CPU actor is fine
    assert OnnxBackbone(onnx_file, convention("magface")).providers == [CPU_EP]
