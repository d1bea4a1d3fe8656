"""Settings of ``qmag-ray recalibrate``, composed of the calibrate and evaluate stages.

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
    register_as: qmagface                       # aliases challenger and champion
    gate: {target_fmr: 1.0e-3, max_fnmr_increase: 0.001}
    grid: {n_fmr: 50, fmr_min: 1.0e-5, fmr_max: 1.0e-2}
    tracking: {experiment: qmag-ray}            # tracking_uri: else MLFLOW_TRACKING_URI
    embed: {actors: 2, batch_size: 128}         # any embed setting but inputs and output

The calibration sections (``grid``, ``method``, ``direct``, ``compare_methods``, ``generate``,
``exhaustive``, ``validation``, ``shards``, ``on_bad``) are calibrate's, ``holdout`` holds
evaluate's pair settings (``on_missing``, ``on_bad``, ``on_self``, ``on_duplicate``...), ``embed``
the embed job's resources: every key is declared once, in the stage it belongs to.
"""

from __future__ import annotations

from qmag_ray.config import option, section, settings
from qmag_ray.embedding.config import EmbedResources
from qmag_ray.pairs.settings import EmbeddingPolicy, PairMode
from qmag_ray.tracking.gate import GateConfig
from qmag_ray.tracking.settings import RegisteredModel, TrackingConfig
from qmag_ray.workflows.config import (
    CalibrationSettings,
    EvaluationSettings,
    PairInputs,
    ValidationMode,
)


@settings
class HoldoutConfig(PairInputs, EvaluationSettings):
    """The held-out protocol on which the challenger and the champion are both evaluated
    (evaluate's pair and evaluation settings; embeddings made with the same model)."""

    def check(self) -> None:
        if not self.pairs:
            raise ValueError("`pairs` is required: the pair list of the held-out protocol")


@settings
class RecalibrateConfig(EmbeddingPolicy, CalibrationSettings, RegisteredModel):
    """One recalibration: embed what is new, calibrate, judge against the champion, register."""

    images: str = option(
        help="Image prefix laid out <identity>/<file>; only new files are embedded.",
        min_length=1,
    )
    embeddings: str = option(
        help="Embeddings folder kept between runs (reused and extended).", min_length=1
    )
    model: str = option(help="MagFace checkpoint (local path or URI).", min_length=1)
    arch: str = option(help="Backbone of the checkpoint (see qmag-ray embed --arch).", min_length=1)
    output: str = option(help="Folder under which each run writes <run-stamp>/.", min_length=1)
    holdout: HoldoutConfig = section(
        HoldoutConfig,
        "the held-out protocol: holdout.embeddings and holdout.pairs (--holdout-embeddings, "
        "--holdout-pairs).",
        prefix="holdout-",
        required=True,
    )
    gate: GateConfig = section(GateConfig, "When the challenger replaces the champion.")
    embed: EmbedResources = section(EmbedResources, "How new images are embedded.")
    tracking: TrackingConfig = section(TrackingConfig, "MLflow tracking.")

    def check(self) -> None:
        if self.pair_mode not in (PairMode.AUTO, PairMode.GENERATE, PairMode.EXHAUSTIVE):
            raise ValueError(
                f"`pair_mode` must be generate or exhaustive for a recalibration (pairs come "
                f"from the identities of new images), got {self.pair_mode.value!r}"
            )
        if self.validation.mode is ValidationMode.PAIRS:
            raise ValueError(
                "validation mode pairs (`validation.mode`) is not used by recalibrate: the "
                "holdout section is the held-out protocol; use split, none or auto"
            )

    @property
    def resolved_pair_mode(self) -> PairMode:
        return PairMode.EXHAUSTIVE if self.pair_mode is PairMode.EXHAUSTIVE else PairMode.GENERATE
