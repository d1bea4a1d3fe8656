"""Configuration of ``qmag-ray recalibrate``: frozen dataclasses loaded from YAML.

Load with ``qmag_ray.config.load_config(RecalibrateConfig, uri, overrides)`` (command line >
file > defaults). Example (``jobs/configs/recalibrate.yaml``)::

    images: s3://bucket/faces/aligned/          # <identity>/<image>; only new files are embedded
    embeddings: s3://bucket/recal/embeddings/   # kept between runs and extended
    model: s3://bucket/models/magface_iresnet100.pth
    arch: iresnet100
    holdout:                                    # the fixed protocol both sides are judged on
      embeddings: s3://bucket/embeddings/lfw/
      pairs: s3://bucket/pairs/lfw_pairs.txt
      protocol: lfw
    output: s3://bucket/recal/runs/             # one sub-folder per run
    register_as: qmagface
    gate: {target_fmr: 1.0e-3, max_fnmr_increase: 0.001}
    grid: {n_fmr: 50, fmr_min: 1.0e-5, fmr_max: 1.0e-2}
    tracking: {experiment: qmag-ray}            # tracking_uri: else MLFLOW_TRACKING_URI
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmag_ray.calibration.result import CalibrationGrid
from qmag_ray.pairs.protocols import PairProtocol
from qmag_ray.pairs.resolve import Match, Policy
from qmag_ray.tracking.gate import GateConfig
from qmag_ray.workflows.config import (
    ExhaustiveConfig,
    GenerateConfig,
    PairMode,
    TrackingConfig,
    ValidationConfig,
)


@dataclass(frozen=True)
class HoldoutConfig:
    """The held-out protocol on which the challenger and the champion are both evaluated.

    Attributes:
        embeddings: embeddings of the protocol's images (same embedding model as ``model``).
        pairs: the pair list (benchmark file or CSV/Parquet ``a, b, label``).
        protocol: its format (None: guessed from the file name).
        prefix, match, on_missing: how pair names map onto the embeddings (as in evaluate).
        edc_fmr: FMR of the error-versus-discard curve in the reports.
    """

    embeddings: str = ""
    pairs: str = ""
    protocol: PairProtocol | None = None
    prefix: str = ""
    match: Match = Match.EXACT
    on_missing: Policy = Policy.ERROR
    edc_fmr: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("embeddings", "pairs"):
            if not getattr(self, name):
                raise ValueError(f"holdout.{name} is required")


@dataclass(frozen=True)
class EmbedSettings:
    """How new images are embedded (see ``qmag-ray embed`` for each setting)."""

    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 64
    resize: bool = False
    max_failure_fraction: float = 0.01


@dataclass(frozen=True)
class RecalibrateConfig:
    """One recalibration: embed what is new, calibrate, judge against the champion, register.

    Attributes:
        images: image prefix, a tree ``<identity>/<image file>`` (identities give the pairs).
        embeddings: folder of the embeddings kept between runs (an embed job output).
        model, arch: the MagFace checkpoint and its backbone.
        output: folder under which each run writes ``<run-stamp>/``.
        holdout: the held-out protocol (required).
        register_as: registered model name (aliases ``challenger`` and ``champion``).
        gate: when the challenger replaces the champion.
        grid, method, pair_mode, generate, exhaustive, validation, shards: the calibration
            (as in ``qmag-ray calibrate``; pairs are generated from identities or exhaustive).
        embed: embedding settings.
        tracking: tracking URI and experiment.
    """

    images: str = ""
    embeddings: str = ""
    model: str = ""
    arch: str = ""
    output: str = ""
    holdout: HoldoutConfig | None = None
    register_as: str = "qmagface"
    gate: GateConfig = field(default_factory=GateConfig)
    grid: CalibrationGrid = field(default_factory=CalibrationGrid)
    method: str = "paper"
    pair_mode: PairMode = PairMode.GENERATE
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    exhaustive: ExhaustiveConfig = field(default_factory=ExhaustiveConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    shards: int = 0
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        for name in ("images", "embeddings", "model", "arch", "output", "register_as"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.holdout is None:
            raise ValueError(
                "holdout is required: holdout.embeddings and holdout.pairs name the protocol "
                "on which the new version and the champion are compared"
            )
        if self.pair_mode not in (PairMode.GENERATE, PairMode.EXHAUSTIVE):
            raise ValueError(
                f"pair_mode must be generate or exhaustive for a recalibration (pairs come from "
                f"the identities of new images), got {self.pair_mode.value!r}"
            )
        if self.shards < 0:
            raise ValueError(f"shards must be >= 0 (0: automatic), got {self.shards}")
        if self.validation.mode.value == "pairs":
            raise ValueError(
                "validation.mode 'pairs' is not used by recalibrate: the holdout section is the "
                "held-out protocol; use split, none or auto"
            )
