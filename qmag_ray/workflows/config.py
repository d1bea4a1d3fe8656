"""Settings of the calibrate and evaluate workflows (``qmag_ray.config`` models) and their stages.

Load them with ``qmag_ray.config.load_config(CalibrateConfig, uri, overrides)``: command-line
overrides > the config file > the defaults below. Top-level keys are the data and pair
settings; ``grid``, ``generate``, ``exhaustive``, ``direct``, ``validation`` and ``tracking``
are nested sections (``--set grid.n_fmr=30`` in the job scripts). Example::

    embeddings: s3://bucket/embeddings/run-001/
    pairs: s3://bucket/pairs/calibration.parquet
    output: s3://bucket/calibration/run-001/
    grid: {n_fmr: 50, fmr_min: 1.0e-5, fmr_max: 1.0e-2}
    method: direct              # paper (default), raw or direct
    direct: {coarse: 41, rounds: 6}
    compare_methods: true
    validation: {mode: split, fraction: 0.5, seed: 0, tolerance: 0.05}
    tracking: {experiment: qmag-ray, register_as: qmagface, alias: champion}

Each stage's settings are declared once (``pairs.settings``, ``calibration``, this module's
validation and evaluation settings, ``tracking.settings``) and composed here by inheritance
(flat keys) and sections (nested keys); the command-line options are generated from them.
"""

from __future__ import annotations

from qmag_ray.calibration.direct import DirectSearch
from qmag_ray.calibration.fit import METHODS, CalibrationMethod
from qmag_ray.calibration.result import CalibrationGrid
from qmag_ray.config import Settings, option, section, settings
from qmag_ray.pairs.protocols import PairProtocol
from qmag_ray.pairs.resolve import Policy
from qmag_ray.pairs.settings import (
    EmbeddingPolicy,
    ExhaustiveConfig,
    GenerateConfig,
    PairGeneration,
    PairListSettings,
    PairMode,
    PathMatching,
    TemplatePooling,
    ValidationMode,
)
from qmag_ray.search.sets import Layout
from qmag_ray.tracking.settings import CalibrateTrackingConfig, TrackingConfig

__all__ = [
    "METHODS",
    "CalibrateConfig",
    "CalibrateTrackingConfig",
    "CalibrationMethod",
    "CalibrationSettings",
    "EmbeddingPolicy",
    "EvaluateConfig",
    "EmbeddingsInput",
    "EvaluationSettings",
    "ExhaustiveConfig",
    "GenerateConfig",
    "IdentifyConfig",
    "PairInputs",
    "PairMode",
    "QualityChoice",
    "QualitySettings",
    "ReportSettings",
    "ScorerSettings",
    "TrackingConfig",
    "ValidationConfig",
    "ValidationMode",
]


@settings
class ValidationConfig(Settings):
    """Held-out validation of the fitted scorer against cosine, and the guard.

    The guard fails when QMagFace is worse than cosine at a judged target FMR by more than
    ``max(abs_tolerance, tolerance x cosine FNMR)``; a target FMR is judged only where the
    held-out impostors allow at least ``min_false_matches`` false matches.
    """

    mode: ValidationMode = option(
        ValidationMode.AUTO,
        "Held-out check: split (identity-disjoint halves), pairs (--validation-pairs), none, "
        "or auto (pairs if given, else split when every embedding has an identity).",
        flag="validation",
    )
    fraction: float = option(
        0.5, "Split: share of identities the fit gets.", flag="validation-fraction", gt=0, lt=1
    )
    seed: int = option(0, "Split: seed of the identity split.", flag="validation-seed")
    pairs: str | None = option(
        None, "Held-out pair list (validation mode pairs).", flag="validation-pairs"
    )
    protocol: PairProtocol | None = option(
        None, "Format of --validation-pairs (default: guessed).", flag="validation-protocol"
    )
    embeddings: str | None = option(
        None,
        "Embeddings of --validation-pairs (default: the calibration's).",
        flag="validation-embeddings",
    )
    tolerance: float = option(
        0.05, "Guard: relative FNMR excess over cosine allowed.", flag="guard-tolerance", ge=0
    )
    abs_tolerance: float = option(
        0.0005, "Guard: absolute FNMR excess allowed.", flag="guard-abs-tolerance", ge=0
    )
    min_false_matches: int = option(
        10,
        "Guard: judge a target FMR only where FMR x held-out impostors reaches this.",
        flag="guard-min-false-matches",
        ge=1,
    )

    def check(self) -> None:
        if self.mode is ValidationMode.PAIRS and not self.pairs:
            raise ValueError("validation `mode` pairs needs `pairs` (a held-out pair list URI)")


@settings
class QualityChoice(Settings):
    """Which per-image quality the QMagFace score uses (alpha and beta are on its scale)."""

    column: str = option(
        "quality",
        "Per-image quality QMagFace uses: 'quality' (the MagFace norm), another column of the "
        "embeddings (e.g. serfiq) or of --quality-file.",
        min_length=1,
    )
    file: str | None = option(
        None,
        "CSV/Parquet file with 'path' (as in the embeddings) and the --quality-column; images "
        "without a value count as missing images.",
    )
    allow_norm: bool = option(
        False,
        "Use the embedding norm as the quality even for a model its embed run marks as not "
        "MagFace-trained (an ONNX model).",
        flag="norm-quality",
    )


@settings
class QualitySettings(QualityChoice):
    """The quality used, and which measures the quality evaluation compares."""

    compare: tuple[str, ...] = option(
        (),
        "Quality measures compared in the error-versus-discard evaluation (repeat the option; "
        "columns of the embeddings or --quality-file; default: --quality-column).",
        flag="edc-quality",
    )
    edc_limit: float = option(
        0.5, "Largest share of genuine pairs discarded on the EDC curves.", gt=0, le=1
    )
    pauc_limit: float = option(
        0.2, "The partial area under each EDC curve is taken up to this share.", gt=0, le=1
    )

    def check(self) -> None:
        if not self.pauc_limit <= self.edc_limit:
            raise ValueError(
                f"need `pauc_limit` <= `edc_limit`, got {self.pauc_limit} and {self.edc_limit}"
            )


@settings
class ReportSettings(Settings):
    """What an evaluation writes beside metrics.json."""

    score_files: bool = option(True, "Write per-pair score files (bob.bio CSV) under scores/.")
    bootstrap: int = option(
        1000, "Identity-bootstrap replicates for FNMR@FMR/EER intervals (0: none).", ge=0
    )
    level: float = option(
        0.95, "Confidence level of the bootstrap intervals.", flag="bootstrap-level", gt=0, lt=1
    )
    seed: int = option(0, "Seed of the bootstrap.", flag="bootstrap-seed")
    groups: tuple[str, ...] = option(
        (),
        "Report per group of this column (repeatable; a column of the embeddings or "
        "--group-file): quality, FNMR and FMR at the global threshold, max/min ratio.",
        flag="group-column",
    )
    group_file: str | None = option(None, "CSV/Parquet file with 'path' and the --group-column(s).")


@settings
class CalibrationSettings(PairGeneration):
    """How alpha and beta are fitted and checked (shared by calibrate and recalibrate)."""

    grid: CalibrationGrid = section(CalibrationGrid, "The FMR x weight search grid.")
    method: CalibrationMethod = option(
        CalibrationMethod.PAPER,
        "Calibration method: paper (the published algorithm), raw (same search, thresholds on "
        "the raw adjusted score) or direct (alpha, beta chosen for the mean log FNMR over the "
        "grid's FMRs).",
    )
    compare_methods: bool = option(
        False,
        "Also fit every other method and report all of them on the held-out side (console "
        "table, calibration.json, MLflow); the guard applies to --method.",
    )
    direct: DirectSearch = section(DirectSearch, "The direct method's search.", prefix="direct-")
    validation: ValidationConfig = section(ValidationConfig, "Held-out check and guard.")
    shards: int = option(0, "Pair shards (Ray tasks); 0: two per CPU of the cluster.", ge=0)
    quality: QualityChoice = section(
        QualityChoice, "The per-image quality alpha and beta are fitted on.", prefix="quality-"
    )


@settings
class EvaluationSettings(Settings):
    """How a scorer is measured on a pair protocol."""

    edc_fmr: float = option(
        1e-3, "FMR at which the error-versus-discard curve is measured.", gt=0, lt=1
    )
    quality: QualitySettings = section(
        QualitySettings, "The quality used and the quality evaluation.", prefix="quality-"
    )
    report: ReportSettings = section(ReportSettings, "Score files, bootstrap, groups.")


ALLOW_INCOMPLETE_HELP = (
    "Use an embed output without a finished summary.json (an interrupted or failed run); "
    "counted and reported. Parts of more than one model are refused regardless."
)


@settings
class EmbeddingsInput(Settings):
    """The embeddings a command reads."""

    embeddings: str = option(
        help="Embeddings: an embed job's output folder, its embeddings/ or a Parquet file.",
        min_length=1,
    )


@settings
class PairInputs(PairListSettings, EmbeddingsInput):
    """Embeddings and a pair list over them; the embeddings must be a finished embed output."""

    allow_incomplete: bool = option(False, ALLOW_INCOMPLETE_HELP)


@settings
class CalibrateConfig(PairInputs, CalibrationSettings):
    """Everything ``run_calibration`` needs; see the module docstring for the YAML layout."""

    output: str = option(
        help="Folder or URI for calibration.json, metrics.json, tables and plots.", min_length=1
    )
    tracking: CalibrateTrackingConfig = section(
        CalibrateTrackingConfig, "MLflow tracking and registration."
    )

    def check(self) -> None:
        mode = self.resolved_pair_mode
        if self.templates and mode is not PairMode.LISTED:
            raise ValueError("`templates` need a template pair list (`pairs`), not generated pairs")
        if mode is PairMode.LISTED and not self.pairs:
            raise ValueError("`pair_mode` listed needs `pairs` (a pair list URI)")
        if mode is not PairMode.LISTED and self.pairs:
            raise ValueError(
                f"`pairs` {self.pairs!r} was given with `pair_mode` {mode.value}; use either a "
                "pair list or generated/exhaustive pairs, not both"
            )

    @property
    def resolved_pair_mode(self) -> PairMode:
        if self.pair_mode is PairMode.AUTO:
            return PairMode.LISTED if self.pairs else PairMode.GENERATE
        return self.pair_mode


@settings
class ScorerSettings(Settings):
    """The QMagFace scorer to apply: a calibration file, or alpha and beta given directly."""

    calibration: str | None = option(
        None, "calibration.json of a calibrate run (or give --alpha and --beta)."
    )
    alpha: float | None = option(None, "QMagFace alpha (with --beta, instead of --calibration).")
    beta: float | None = option(None, "QMagFace beta (with --alpha, instead of --calibration).")

    def check(self) -> None:
        given = (self.alpha is not None, self.beta is not None)
        if self.calibration and any(given):
            raise ValueError(
                "give either `calibration` (a calibration.json) or `alpha` and `beta`, not both"
            )
        if not self.calibration and not all(given):
            raise ValueError(
                "give `calibration` (a calibration.json URI) or both `alpha` and `beta`"
            )


@settings
class EvaluateConfig(PairInputs, ScorerSettings, EvaluationSettings):
    """Everything ``run_evaluation`` needs: the pairs (required), the scorer, the output.

    A benchmark list with images missing from the embeddings fails unless ``on_missing: skip``.
    """

    output: str = option(help="Folder or URI for metrics.json and plots.", min_length=1)
    allow_other_model: bool = option(
        False,
        "Apply a calibration fitted on embeddings of another model (their model sha256s "
        "differ); refused by default.",
    )
    tracking: TrackingConfig = section(TrackingConfig, "MLflow tracking.")

    def check(self) -> None:
        if not self.pairs:
            raise ValueError("`pairs` is required: the pair list to evaluate")


@settings
class IdentifyConfig(EmbeddingsInput, PathMatching, ScorerSettings, TemplatePooling):
    """Everything ``run_identification`` needs.

    Gallery and probes are CSV/Parquet lists ``path, identity[, subset]`` (or template lists
    ``path, template[, media], identity``; IJB's 1:N CSVs), or found among the embeddings'
    paths as a release lays them out (``layout``). Probes whose identity is not enrolled are
    the open-set non-mated searches, never skipped.
    """

    output: str = option(
        help="Folder or URI for metrics.json and candidates.parquet.", min_length=1
    )
    gallery: str | None = option(
        None,
        "Gallery list: CSV path, identity (empty identity = distractor), or a template list "
        "path, template[, media], identity (IJB 1:N CSVs too).",
    )
    probes: str | None = option(
        None, "Probe list: CSV path, identity[, subset] (or a template list)."
    )
    layout: Layout | None = option(
        None, "Find gallery and probes in the embeddings' paths: scface or tinyface."
    )
    shards: int = option(0, "Gallery shards (Ray tasks); 0: two per CPU of the cluster.", ge=0)
    on_missing: Policy = option(
        Policy.ERROR,
        "Listed images not in the embeddings (or unusable): error or skip (counted).",
    )
    on_unlabelled: Policy = option(
        Policy.ERROR, "Probes without an identity: error or skip (counted)."
    )
    quality: QualityChoice = section(
        QualityChoice, "The per-image quality the QMagFace ranking uses.", prefix="quality-"
    )
    tracking: TrackingConfig = section(TrackingConfig, "MLflow tracking.")

    def check(self) -> None:
        if self.layout is not None:
            if self.gallery or self.probes:
                raise ValueError("give either `layout` or `gallery` and `probes`, not both")
        elif not (self.gallery and self.probes):
            raise ValueError(
                "give `gallery` and `probes` (CSV lists) or a `layout` (scface, tinyface)"
            )
