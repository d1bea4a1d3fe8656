"""ONNX recognisers through onnxruntime, with their input convention as an explicit setting.

The embedding pipeline decodes every face to MagFace's input: BGR, values / 255, NCHW
float32, 112x112. An ``InputConvention`` turns that into what another network expects:
channel order, then ``(x - mean) / std`` per channel on the [0, 1] values. Two are named:

- ``magface``: BGR, mean 0, std 1 (values / 255), MagFace's own iResNets;
- ``insightface``: RGB, ``(pixel - 127.5) / 127.5`` = mean 0.5, std 0.5 on [0, 1] values, the
  convention of InsightFace's ArcFace ONNX models.

Per-backbone facts travel with the backbone (``BackboneFacts``): the registry's iResNets are
MagFace-trained (their norm is a quality); an ONNX model is not unless the user says so, so
downstream commands refuse its norm as a quality unless asked (``--norm-quality``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qmag_ray import storage


@dataclass(frozen=True)
class InputConvention:
    """How a network wants its input, from the pipeline's BGR [0, 1] NCHW batch."""

    name: str
    channel_order: str = "BGR"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.channel_order not in ("BGR", "RGB"):
            raise ValueError(f"channel_order must be BGR or RGB, got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values (std > 0), one per channel")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x``: (N, 3, H, W) float32, BGR in [0, 1] -> the network's input (float32)."""
        if self.channel_order == "RGB":
            x = x[:, ::-1]
        mean = np.asarray(self.mean, np.float32)[None, :, None, None]
        std = np.asarray(self.std, np.float32)[None, :, None, None]
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def describe(self) -> str:
        return f"{self.name}: {self.channel_order}, ([0,1] - {list(self.mean)}) / {list(self.std)}"


CONVENTIONS = {
    "magface": InputConvention("magface", "BGR", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "insightface": InputConvention("insightface", "RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def convention(name: str) -> InputConvention:
    """A named convention (``magface``, ``insightface``)."""
    try:
        return CONVENTIONS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown input convention {name!r}; use one of {', '.join(CONVENTIONS)}"
        ) from None


@dataclass(frozen=True)
class BackboneFacts:
    """What the pipeline must know about a backbone besides its weights."""

    input_convention: InputConvention
    norm_is_quality: bool


MAGFACE_FACTS = BackboneFacts(CONVENTIONS["magface"], norm_is_quality=True)


def is_onnx(uri: str) -> bool:
    """Whether ``uri`` names an ONNX model file."""
    return uri.lower().endswith(".onnx")


CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def select_providers(available: list[str], use_gpu: bool) -> list[str]:
    """onnxruntime execution providers for a session, in order of preference.

    On a GPU actor (``use_gpu``): CUDA first, the CPU after it for the operators CUDA lacks.
    A GPU actor whose onnxruntime has no CUDA provider (the CPU-only ``onnxruntime`` wheel
    instead of ``onnxruntime-gpu``) is an error rather than a silent CPU run holding a GPU.
    """
    if not use_gpu:
        return [CPU]
    if CUDA not in available:
        raise ValueError(
            f"the actor has a GPU but onnxruntime offers no {CUDA} (available: "
            f"{', '.join(available) or 'none'}); install onnxruntime-gpu on the workers or "
            "run the ONNX model with --gpus-per-actor 0"
        )
    return [CUDA, CPU]


def check_session_providers(requested: list[str], got: list[str]) -> None:
    """Refuse a session that dropped CUDA although it was requested (onnxruntime-gpu falls
    back to the CPU with a warning only, e.g. when the CUDA or cuDNN libraries do not load)."""
    if requested[0] == CUDA and (not got or got[0] != CUDA):
        raise ValueError(
            f"onnxruntime could not start {CUDA} (the session runs on {', '.join(got) or '-'}): "
            "check the CUDA and cuDNN libraries onnxruntime-gpu needs on the workers, or run "
            "with --gpus-per-actor 0"
        )


class OnnxBackbone:
    """An ONNX embedding network on onnxruntime (CUDA provider when asked and available)."""

    def __init__(
        self, uri: str, input_convention: InputConvention, use_gpu: bool = False, threads: int = 1
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        providers = select_providers(ort.get_available_providers(), use_gpu)
        try:
            self.session = ort.InferenceSession(
                storage.read_bytes(uri), sess_options=options, providers=providers
            )
        except FileNotFoundError:
            raise ValueError(f"ONNX model not found: {storage.redact(uri)}") from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types
            raise ValueError(
                f"{storage.redact(uri)} is not a loadable ONNX model: "
                f"{(str(exc).splitlines() or [''])[0]}"
            ) from None
        self.providers = self.session.get_providers()
        check_session_providers(providers, self.providers)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{storage.redact(uri)}: expected one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.convention = input_convention
        self.embedding_size = int(self(np.zeros((1, 3, 112, 112), np.float32)).shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) of a BGR [0, 1] NCHW float32 batch."""
        out = self.session.run(None, {self.input_name: self.convention.apply(x)})[0]
        return np.asarray(out, np.float32).reshape(len(x), -1)


def describe_onnx(uri: str, input_convention: InputConvention) -> dict[str, Any]:
    """Embedding size and sha256 of an ONNX model, loading it once on the CPU."""
    net = OnnxBackbone(uri, input_convention)
    return {"embedding_size": net.embedding_size, "sha256": storage.sha256(uri), "arch": "onnx"}
