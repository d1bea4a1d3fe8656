"""The model actor of the embedding pipeline: one network per actor, batches in, embeddings out."""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from qmag_ray.images import to_input

logger = logging.getLogger(__name__)


class EmbedActor:
    """Callable class for Ray Data ``map_batches``: loads the backbone once, embeds batches.

    Rows whose ``error`` is not empty (files that could not be read or decoded) pass through
    with a zero embedding and their error; only good rows go through the network.

    Args:
        model: checkpoint URI.
        arch: backbone name.
        use_gpu: run on CUDA when the actor has a GPU.
        threads: torch CPU threads (used without a GPU).
        mixed_precision: autocast the forward pass on GPU.
        amp_dtype: ``float16`` or ``bfloat16``.
        channels_last: channels-last memory format for network and input.
        serfiq: SER-FIQ settings (``SerfiqSettings.to_dict()``) to add a ``serfiq`` column:
            the trunk runs once, the head once without dropout (the embedding) and
            ``passes`` times with per-image seeded masks (needs the batch's ``path``).
    """

    def __init__(
        self,
        model: str,
        arch: str,
        *,
        use_gpu: bool = False,
        threads: int = 1,
        mixed_precision: bool = False,
        amp_dtype: str = "float16",
        channels_last: bool = False,
        serfiq: dict | None = None,
        input_convention: str | None = None,
    ) -> None:
        import torch

        self.onnx = None
        if model.lower().endswith(".onnx") or arch.lower() == "onnx":
            from qmag_ray.model.onnx import OnnxBackbone, convention

            self._torch = torch
            self.onnx = OnnxBackbone(
                model, convention(input_convention or "magface"), use_gpu, threads
            )
            self.embedding_size = self.onnx.embedding_size
            self.serfiq = None
            return

        from qmag_ray.model.checkpoint import load_backbone

        self._torch = torch
        cuda = use_gpu and torch.cuda.is_available()
        if use_gpu and not cuda:
            logger.warning("actor was given a GPU but torch sees no CUDA device; using the CPU")
        self.device = torch.device("cuda") if cuda else torch.device("cpu")
        if not cuda:
            torch.set_num_threads(threads)
        self.net = load_backbone(model, arch, device=str(self.device))
        self.net.eval()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.autocast = mixed_precision and cuda
        self.amp_dtype = getattr(torch, amp_dtype)
        self.serfiq = None
        if serfiq is not None:
            from qmag_ray.quality.serfiq import SerfiqSettings

            self.serfiq = SerfiqSettings(
                serfiq["passes"],
                serfiq["dropout"],
                serfiq["seed"],
                serfiq.get("dropout_type", "element"),
            )
        with torch.inference_mode():
            probe = torch.zeros(1, 3, 112, 112, device=self.device)
            self.embedding_size = int(self._forward(probe).shape[1])

    def _forward(self, x):  # noqa: ANN001, ANN202 - torch tensors
        torch = self._torch
        ctx = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.autocast
            else contextlib.nullcontext()
        )
        with ctx:
            return self.net(x)

    def _serfiq_forward(self, x, paths: list[str]):  # noqa: ANN001, ANN202 - torch tensors
        from qmag_ray.quality.serfiq import image_key, serfiq_qualities

        torch = self._torch
        ctx = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.autocast
            else contextlib.nullcontext()
        )
        with ctx:
            trunk = self.net.trunk(x)
            emb = self.net.head(trunk)
        assert self.serfiq is not None
        keys = [image_key(self.serfiq.seed, p) for p in paths]
        quality = serfiq_qualities(self.net, trunk.float(), keys, self.serfiq)
        return emb, quality

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        errors = np.asarray(batch["error"], dtype=object)
        good = np.flatnonzero(errors == "")
        out = np.zeros((len(errors), self.embedding_size), dtype=np.float32)
        serfiq = np.zeros(len(errors), dtype=np.float32)
        if len(good) and self.onnx is not None:
            images = np.asarray(batch["image"])
            images = images if len(good) == len(errors) else images[good]
            out[good] = self.onnx(to_input(images))
        elif len(good):
            images = np.asarray(batch["image"])
            images = images if len(good) == len(errors) else images[good]
            x = torch.from_numpy(to_input(images)).to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=self.memory_format)
            with torch.inference_mode():
                if self.serfiq is None:
                    emb = self._forward(x).float().cpu().numpy()
                else:
                    paths = [str(p) for p in np.asarray(batch["path"], dtype=object)[good]]
                    e, q = self._serfiq_forward(x, paths)
                    emb = e.float().cpu().numpy()
                    serfiq[good] = q.float().cpu().numpy()
            out[good] = emb
        result = {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "embedding": out,
            "error": errors,
            "resized_from": np.asarray(batch["resized_from"], dtype=object),
        }
        if self.serfiq is not None:
            result["serfiq"] = serfiq
        return result
