"""What an embedding run needs: inputs, checkpoint, output and how to spread the work.

``EmbedResources`` (how the work is spread and run) is also the ``embed`` section of a
recalibration; ``EmbedConfig`` adds the inputs, the model and the output.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from qmag_ray.config import Settings, option, settings

#: Backbones of ``qmag_ray.model`` (a test checks this list against the registry).
ARCH_HELP = (
    "Backbone of the checkpoint: iresnet18, iresnet34, iresnet50, iresnet100, or iresnet-demo "
    "(the bundled demo model, qmag_ray/assets/demo_iresnet.pth)."
)


class EmbedError(RuntimeError):
    """An embedding run that cannot start or did not succeed; the message says why."""


class EmbedInputError(EmbedError):
    """Inputs, output folder or resources the run refuses before it starts: a user error
    (``qmag-ray embed`` exits 2; a run that started and failed exits 1)."""


class AmpDtype(str, Enum):
    """Floating-point type of mixed precision."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


@settings
class EmbedResources(Settings):
    """How an embedding run spreads its work over Ray (``qmag-ray embed``, recalibrate's embed).

    The actor pool is refused unless ``actors * cpus_per_actor + read_cpus`` fits the cluster,
    so decoding can always run next to the actors (or waited for with
    ``wait_for_resources``). One CPU per read task (decoding is CPU-bound) also keeps the number
    of worker processes, and their start-up cost, low on small machines.
    """

    actors: int = option(1, "Model actors (each holds one copy of the network).", ge=1)
    gpus_per_actor: float = option(0.0, "GPUs per actor; 0 runs on CPU, 0.5 shares a GPU.", ge=0)
    cpus_per_actor: float = option(
        1.0,
        "CPUs Ray reserves per actor; keep actors x this below the cluster's CPUs so decoding "
        "can run.",
        ge=0,
    )
    threads_per_actor: int | None = option(
        None, "Torch CPU threads per actor (default: --cpus-per-actor rounded up).", ge=1
    )
    batch_size: int = option(64, "Images per forward pass.", ge=1)
    read_cpus: float = option(1.0, "CPUs reserved per read-and-decode task.", ge=0)
    read_block_rows: int | None = option(
        None,
        "Inputs per read task, also the granularity of results (default: --batch-size).",
        ge=1,
    )
    mixed_precision: bool = option(False, "Autocast the forward pass on GPU (ignored on CPU).")
    amp_dtype: AmpDtype = option(AmpDtype.FLOAT16, "Mixed-precision type.")
    channels_last: bool = option(False, "Channels-last memory format for network and input.")
    resize: bool = option(
        False, "Resize images that are not 112x112 (bilinear, logged) instead of failing them."
    )
    max_failure_fraction: float = option(
        0.01,
        "Fail the run when more than this fraction of images fail (everything is still written).",
        ge=0,
        le=1,
    )
    wait_for_resources: bool = option(
        False,
        "Start even if the cluster lacks the CPUs/GPUs of the actor pool for now (an "
        "autoscaler adds nodes); otherwise such a run is refused at once.",
    )
    rows_per_part: int = option(
        10_000,
        "No longer used: the model actors write one part per batch (accepted so that older "
        "configs still run).",
        ge=1,
    )
    progress_seconds: float = option(10.0, "Seconds between progress lines.", gt=0)
    read_attempts: int = option(
        5,
        "Attempts per file read before it is recorded as a transient failure (retried by "
        "running the same command again); each includes the storage client's own retries.",
        ge=1,
    )
    resources: dict[str, float] | None = option(
        None,
        "Custom Ray resources every task and actor of the run requires, NAME=AMOUNT "
        "(repeatable; e.g. embed_node=0.01 keeps the work on the nodes that declare it).",
    )

    def check(self) -> None:
        if self.cpus_per_actor == 0 and self.gpus_per_actor == 0:
            raise ValueError("an actor needs `cpus_per_actor` > 0 when it has no GPU")
        for name, amount in (self.resources or {}).items():
            if not amount > 0:
                raise ValueError(f"`resources` {name} must be a positive number, got {amount!r}")

    @property
    def block_rows(self) -> int:
        """Inputs per read task."""
        return self.read_block_rows or self.batch_size

    @property
    def torch_threads(self) -> int:
        """Torch CPU threads per actor."""
        if self.threads_per_actor is not None:
            return self.threads_per_actor
        return max(1, int(-(-self.cpus_per_actor // 1)))


@settings
class EmbedConfig(EmbedResources):
    """Settings of one embedding run (``qmag-ray embed``): inputs, model, output, resources.

    ``images`` is a tree ``<identity>/<image file>`` (the identity is the first folder under
    it; files directly under it have no identity); ``manifest`` a CSV or Parquet table with a
    ``path`` column (relative to ``images_root``) and an optional ``identity`` column.
    """

    images: str | None = option(
        None,
        "Folder or URI of the images, laid out as <identity>/<image file> (the first folder "
        "under it is the identity). Use this or --manifest.",
    )
    manifest: str | None = option(
        None,
        "CSV or Parquet table of the images: 'path' relative to --images-root, optional "
        "'identity'. Use this or --images.",
    )
    images_root: str | None = option(
        None, "Root the manifest's paths are relative to (default: the manifest's folder)."
    )
    model: str = option(
        help="MagFace checkpoint: a local path or URI (s3://, gs://...).", min_length=1
    )
    arch: str = option(help=ARCH_HELP, min_length=1)
    output: str = option(
        help="Output folder or URI: embeddings/, failures/ and summary.json.", min_length=1
    )
    overwrite: bool = option(
        False,
        "Replace a finished output; without it a finished output is refused and an "
        "interrupted one is resumed.",
    )
    landmarks: str | None = option(
        None,
        "IJB *_5pts_score.txt (name x1 y1 ... x5 y5 score): align every image onto the ArcFace "
        "112x112 template by its five landmarks (a manifest with lm0_x ... lm4_y columns aligns "
        "without it).",
    )
    flip: bool = option(
        False,
        "Flip test-time augmentation: the embedding is the mean of the embeddings of the face "
        "and its mirror image (the norm stays on the model's quality scale).",
    )
    quality: Literal["norm", "serfiq"] = option(
        "norm",
        "norm (the 'quality' column: the MagFace norm) or serfiq (also a 'serfiq' column: "
        "SER-FIQ from dropout passes of the network's head).",
    )
    serfiq_passes: int = option(100, "SER-FIQ stochastic passes per image.", ge=2)
    serfiq_dropout: float = option(0.5, "SER-FIQ dropout rate of the passes.", gt=0, lt=1)
    serfiq_seed: int = option(0, "Seed of the SER-FIQ dropout masks (with each image's path).")
    serfiq_dropout_type: Literal["element", "channel"] = option(
        "element", "SER-FIQ dropout: element, or channel (Dropout2d, as MagFace's trainer)."
    )
    input_convention: Literal["insightface", "magface"] | None = option(
        None,
        "Input convention of an ONNX model (--model *.onnx, --arch onnx): insightface (RGB, "
        "(x - 127.5) / 127.5) or magface (BGR, x / 255).",
    )

    @property
    def is_onnx(self) -> bool:
        """Whether the model is an ONNX file run by onnxruntime."""
        return self.model.lower().endswith(".onnx") or self.arch.lower() == "onnx"

    @property
    def serfiq_settings(self):  # noqa: ANN201 - SerfiqSettings | None
        """The SER-FIQ settings, or None when only the norm is computed."""
        if self.quality != "serfiq":
            return None
        from qmag_ray.quality.serfiq import SerfiqSettings

        return SerfiqSettings(
            self.serfiq_passes, self.serfiq_dropout, self.serfiq_seed, self.serfiq_dropout_type
        )

    def check(self) -> None:
        if self.is_onnx and not self.input_convention:
            raise ValueError(
                "an ONNX model needs input_convention (--input-convention insightface or "
                "magface): the file does not say how its input is scaled"
            )
        if self.is_onnx and self.quality == "serfiq":
            raise ValueError(
                "quality serfiq needs the network's head (an iResNet of the registry); an ONNX "
                "model is opaque: use a quality tool and --quality-file downstream"
            )
        if self.input_convention:
            from qmag_ray.model.onnx import convention

            convention(self.input_convention)
        if self.quality == "serfiq":
            self.serfiq_settings  # noqa: B018 - validates the dropout type
        if self.flip and self.quality == "serfiq":
            raise ValueError(
                "--flip cannot be combined with --quality serfiq (SER-FIQ's dropout passes "
                "score one image, not the mean of a face and its mirror): drop one of the two"
            )
        if bool(self.images) == bool(self.manifest):
            raise ValueError("give exactly one of `images` (a folder tree) or `manifest` (a table)")
        if self.images_root and not self.manifest:
            raise ValueError("`images_root` only applies with `manifest`")
