"""Configuration of the calibrate and evaluate workflows: frozen dataclasses loaded from YAML.

Load them with ``qmag_ray.config.load_config(CalibrateConfig, uri, overrides)``: command-line
overrides > the config file > the defaults below. Top-level keys are the data and pair
settings; ``grid``, ``generate``, ``exhaustive``, ``direct``, ``validation`` and ``tracking``
are nested sections (``--set grid.n_fmr=30`` in the job scripts). Example::

    embeddings: s3://bucket/embeddings/run-001/
    pairs: s3://bucket/pairs/calibration.parquet
    output: s3://bucket/calibration/run-001/
    grid: {n_fmr: 50, fmr_min: 1.0e-5, fmr_max: 1.0e-2}
    method: direct              # paper (default), raw or direct
    compare_methods: true
    validation: {mode: split, fraction: 0.5, seed: 0}
    tracking: {experiment: qmag-ray, register_as: qmagface}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from qmag_ray.calibration.direct import DirectSearch
from qmag_ray.calibration.fit import METHODS
from qmag_ray.calibration.result import CalibrationGrid
from qmag_ray.pairs.protocols import PairProtocol
from qmag_ray.pairs.resolve import Match, Policy
from qmag_ray.pairs.templates import Pooling


class PairMode(str, Enum):
    """Where the calibration pairs come from; ``auto``: a pair list if given, else generated."""

    AUTO = "auto"
    LISTED = "listed"
    GENERATE = "generate"
    EXHAUSTIVE = "exhaustive"


class ValidationMode(str, Enum):
    """How the held-out side is formed.

    ``auto``: ``pairs`` when a validation pair list is given, else ``split`` when every
    embedding has an identity label, else ``none`` (with a warning in the outcome).
    """

    AUTO = "auto"
    SPLIT = "split"
    PAIRS = "pairs"
    NONE = "none"


@dataclass(frozen=True)
class GenerateConfig:
    """Pairs generated from identity labels (spec section 5)."""

    seed: int = 0
    max_per_identity: int = 10
    impostors_per_side: int = 5

    def __post_init__(self) -> None:
        if self.max_per_identity < 2:
            raise ValueError(f"generate.max_per_identity must be >= 2, got {self.max_per_identity}")
        if self.impostors_per_side < 1:
            raise ValueError(
                f"generate.impostors_per_side must be >= 1, got {self.impostors_per_side}"
            )


@dataclass(frozen=True)
class ExhaustiveConfig:
    """Every pair of the (fit-side) embeddings, scored block-wise as matrix products."""

    block_size: int = 4096

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"exhaustive.block_size must be >= 2, got {self.block_size}")


@dataclass(frozen=True)
class ValidationConfig:
    """Held-out validation of the fitted scorer against cosine, and the guard.

    Attributes:
        mode: see ``ValidationMode``.
        fraction: share of identities the fit side gets in ``split`` mode.
        seed: seed of the identity split.
        pairs: validation pair list (``pairs`` mode).
        protocol: its format (None: guessed from the file name).
        embeddings: embeddings the validation pairs refer to (None: the calibration's).
        tolerance: relative FNMR excess over cosine the guard allows (0.05 = 5%).
        abs_tolerance: absolute FNMR excess the guard allows (0.0005 = 0.05 points);
            the larger of the two applies.
        min_false_matches: a target FMR is judged only where the held-out impostors allow at
            least this many false matches (FMR x impostor count).
    """

    mode: ValidationMode = ValidationMode.AUTO
    fraction: float = 0.5
    seed: int = 0
    pairs: str | None = None
    protocol: PairProtocol | None = None
    embeddings: str | None = None
    tolerance: float = 0.05
    abs_tolerance: float = 0.0005
    min_false_matches: int = 10

    def __post_init__(self) -> None:
        if self.min_false_matches < 1:
            raise ValueError(
                f"validation.min_false_matches must be >= 1, got {self.min_false_matches}"
            )
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"validation.fraction must lie in (0, 1), got {self.fraction}")
        if self.tolerance < 0 or self.abs_tolerance < 0:
            raise ValueError("validation.tolerance and validation.abs_tolerance must be >= 0")
        if self.mode is ValidationMode.PAIRS and not self.pairs:
            raise ValueError("validation.mode 'pairs' needs validation.pairs (a pair list URI)")


@dataclass(frozen=True)
class QualitySettings:
    """Which per-image quality scores use, and which measures the quality evaluation compares.

    Attributes:
        column: the quality QMagFace uses: ``quality`` (the MagFace norm, default), or another
            column of the embeddings (``serfiq``) or of ``file``.
        file: a joined CSV/Parquet file (``path`` + columns) read instead of the embeddings.
        compare: quality measures drawn side by side in the error-versus-discard evaluation
            (columns of the embeddings or of ``file``); empty: ``column`` alone.
        edc_limit: largest share of genuine pairs discarded on the curves.
        pauc_limit: the partial area under each curve is taken up to this share.
    """

    column: str = "quality"
    file: str | None = None
    compare: tuple[str, ...] = ()
    edc_limit: float = 0.5
    pauc_limit: float = 0.2

    def __post_init__(self) -> None:
        if not self.column:
            raise ValueError("quality.column must name a column")
        if not 0 < self.pauc_limit <= self.edc_limit <= 1:
            raise ValueError(
                "need 0 < quality.pauc_limit <= quality.edc_limit <= 1, got "
                f"{self.pauc_limit} and {self.edc_limit}"
            )


@dataclass(frozen=True)
class ReportSettings:
    """What an evaluation writes beside metrics.json.

    Attributes:
        score_files: per-pair score files (bob.bio CSV layout) under ``scores/``.
        bootstrap: identity-bootstrap replicates for the FNMR@FMR and EER intervals (0: none).
        level: the intervals' confidence level.
        seed: the bootstrap's seed.
        groups: group columns (of the embeddings or ``group_file``) reported per group.
        group_file: a joined CSV/Parquet file (``path`` + the group columns).
    """

    score_files: bool = True
    bootstrap: int = 1000
    level: float = 0.95
    seed: int = 0
    groups: tuple[str, ...] = ()
    group_file: str | None = None

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ValueError(f"report.bootstrap must be >= 0, got {self.bootstrap}")
        if not 0 < self.level < 1:
            raise ValueError(f"report.level must lie in (0, 1), got {self.level}")


@dataclass(frozen=True)
class TrackingConfig:
    """Where the run is recorded. ``tracking_uri`` None: ``MLFLOW_TRACKING_URI``, else SQLite."""

    tracking_uri: str | None = None
    experiment: str = "qmag-ray"


@dataclass(frozen=True)
class CalibrateTrackingConfig(TrackingConfig):
    """Tracking plus registration of the fitted scorer (``register: false`` skips it)."""

    register_as: str = "qmagface"
    register: bool = True


@dataclass(frozen=True)
class CalibrateConfig:
    """Everything ``run_calibration`` needs; see the module docstring for the YAML layout.

    Attributes:
        embeddings: the embeddings (embed job output, ``embeddings/`` folder or a Parquet file).
        output: folder or URI for calibration.json, metrics.json, tables and plots.
        pairs: a pair list (benchmark file or CSV/Parquet ``a, b, label``); listed mode.
        protocol: its format (None: guessed from the file name).
        pair_mode: listed, generate, exhaustive, or auto (listed if ``pairs``, else generate).
        prefix, match: how pair names map onto the embeddings' ``path`` column.
        method: calibration method: ``paper`` (the published algorithm, default), ``raw``
            (the same search, thresholds on the raw adjusted score) or ``direct`` (alpha and
            beta chosen for the mean log FNMR over the grid's FMRs; settings in ``direct``).
        compare_methods: also fit every other method on the fit side and report all of them
            on the held-out side (the chosen method's guard alone decides registration).
        shards: pair shards (Ray tasks); 0 picks two per CPU of the cluster.
        templates: a template table (IJB ``*_face_tid_mid.txt`` or CSV ``path, template,
            media``): the embeddings are pooled into templates and ``pairs`` name templates.
        pooling: ``quality`` (the published quality-weighted rule) or ``mean``.
        on_missing, on_bad, on_self, on_duplicate: what to do with pairs naming images not in
            the table, unusable (NaN/zero) embeddings, self-pairs and repeated pairs:
            ``error`` (default) or ``skip`` (skips are counted and reported).
        allow_incomplete: use an embed output without a finished summary.json (interrupted
            or failed run); counted and reported. Mixed models are refused regardless.
        quality: the per-image quality alpha and beta are fitted on (``quality.column``,
            ``quality.file``; the other fields only matter for evaluate).
    """

    embeddings: str = ""
    output: str = ""
    pairs: str | None = None
    protocol: PairProtocol | None = None
    pair_mode: PairMode = PairMode.AUTO
    prefix: str = ""
    match: Match = Match.EXACT
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    exhaustive: ExhaustiveConfig = field(default_factory=ExhaustiveConfig)
    grid: CalibrationGrid = field(default_factory=CalibrationGrid)
    method: str = "paper"
    compare_methods: bool = False
    direct: DirectSearch = field(default_factory=DirectSearch)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    shards: int = 0
    templates: str | None = None
    pooling: Pooling = Pooling.QUALITY
    on_missing: Policy = Policy.ERROR
    on_bad: Policy = Policy.ERROR
    on_self: Policy = Policy.ERROR
    on_duplicate: Policy = Policy.ERROR
    allow_incomplete: bool = False
    tracking: CalibrateTrackingConfig = field(default_factory=CalibrateTrackingConfig)
    quality: QualitySettings = field(default_factory=QualitySettings)

    def __post_init__(self) -> None:
        if not self.embeddings:
            raise ValueError("embeddings is required (the URI of the embeddings table)")
        if not self.output:
            raise ValueError("output is required (a folder or URI for the results)")
        if self.shards < 0:
            raise ValueError(f"shards must be >= 0 (0: automatic), got {self.shards}")
        if self.method not in METHODS:
            raise ValueError(
                f"method {self.method!r} is not a calibration method; use one of "
                f"{', '.join(METHODS)}"
            )
        mode = self.resolved_pair_mode
        _check_templates(self.templates, self.protocol, self.pairs)
        if self.templates and mode is not PairMode.LISTED:
            raise ValueError("templates need a template pair list (pairs), not generated pairs")
        if mode is PairMode.LISTED and not self.pairs:
            raise ValueError("pair_mode 'listed' needs pairs (a pair list URI)")
        if mode is not PairMode.LISTED and self.pairs:
            raise ValueError(
                f"pairs {self.pairs!r} was given with pair_mode {mode.value!r}; use either a "
                "pair list or generated/exhaustive pairs, not both"
            )

    @property
    def resolved_pair_mode(self) -> PairMode:
        if self.pair_mode is PairMode.AUTO:
            return PairMode.LISTED if self.pairs else PairMode.GENERATE
        return self.pair_mode


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything ``run_evaluation`` needs.

    Attributes:
        embeddings, pairs, protocol, prefix, match: the pairs to evaluate and their images.
        calibration: a calibration.json; or give ``alpha`` and ``beta`` directly.
        output: folder or URI for metrics.json and plots.
        edc_fmr: FMR at which the error-versus-discard curve is measured.
        templates, pooling: as in ``CalibrateConfig`` (template protocols ijbb/ijbc).
        on_missing, on_bad, on_self, on_duplicate: as in ``CalibrateConfig``; a benchmark
            list with images missing from the embeddings fails unless ``on_missing: skip``.
        allow_incomplete: as in ``CalibrateConfig``.
        allow_other_model: apply a calibration fitted on embeddings of another model (the
            model sha256s differ); refused by default.
        quality: which per-image quality the QMagFace score uses and which measures the
            quality evaluation compares (``QualitySettings``).
        report: score files, bootstrap intervals and group reports (``ReportSettings``).
    """

    embeddings: str = ""
    pairs: str = ""
    output: str = ""
    protocol: PairProtocol | None = None
    prefix: str = ""
    match: Match = Match.EXACT
    calibration: str | None = None
    alpha: float | None = None
    beta: float | None = None
    edc_fmr: float = 1e-3
    templates: str | None = None
    pooling: Pooling = Pooling.QUALITY
    on_missing: Policy = Policy.ERROR
    on_bad: Policy = Policy.ERROR
    on_self: Policy = Policy.ERROR
    on_duplicate: Policy = Policy.ERROR
    allow_incomplete: bool = False
    allow_other_model: bool = False
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    quality: QualitySettings = field(default_factory=QualitySettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    def __post_init__(self) -> None:
        for name in ("embeddings", "pairs", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        given = (self.alpha is not None, self.beta is not None)
        if self.calibration and any(given):
            raise ValueError("give either calibration (a calibration.json) or alpha and beta")
        if not self.calibration and not all(given):
            raise ValueError("give calibration (a calibration.json URI) or both alpha and beta")
        if not 0 < self.edc_fmr < 1:
            raise ValueError(f"edc_fmr must lie in (0, 1), got {self.edc_fmr}")
        _check_templates(self.templates, self.protocol, self.pairs)


def _check_templates(
    templates: str | None, protocol: PairProtocol | None, pairs: str | None
) -> None:
    """A template protocol needs a template table, and a template table template pairs."""
    proto = None if protocol is None else PairProtocol(protocol)
    if proto is not None and proto.is_template and not templates:
        raise ValueError(
            f"protocol {proto.value} compares templates: give templates (--templates, the "
            "*_face_tid_mid.txt or a CSV path, template, media)"
        )
    if templates and proto is not None and not (proto.is_template or proto is PairProtocol.GENERIC):
        raise ValueError(
            f"templates were given with the image protocol {proto.value}; use protocol ijbb, "
            "ijbc or generic (a CSV a, b, label naming templates)"
        )


@dataclass(frozen=True)
class IdentifyConfig:
    """Everything ``run_identification`` needs.

    Attributes:
        embeddings: the embeddings (embed job output, ``embeddings/`` folder or a Parquet file).
        output: folder or URI for metrics.json and candidates.parquet.
        gallery, probes: CSV/Parquet lists ``path, identity[, subset]`` (or template lists
            ``path, template[, media], identity``; IJB's 1:N CSVs); exclusive with ``layout``.
        layout: ``scface`` or ``tinyface``: gallery and probes found among the embeddings'
            paths as the release lays them out.
        prefix, match: how list paths map onto the embeddings' ``path`` column.
        calibration, alpha, beta: the QMagFace scorer (a calibration.json, or alpha and beta).
        pooling: pooling rule of template lists.
        shards: gallery shards (Ray tasks); 0 picks two per CPU of the cluster.
        on_missing: listed images not in the embeddings (or unusable): error or skip (counted).
        on_unlabelled: probes without an identity: error or skip (counted). Probes whose
            identity is not enrolled are the open-set non-mated searches, never skipped.
    """

    embeddings: str = ""
    output: str = ""
    gallery: str | None = None
    probes: str | None = None
    layout: str | None = None
    prefix: str = ""
    match: Match = Match.EXACT
    calibration: str | None = None
    alpha: float | None = None
    beta: float | None = None
    pooling: Pooling = Pooling.QUALITY
    shards: int = 0
    on_missing: Policy = Policy.ERROR
    on_unlabelled: Policy = Policy.ERROR

    def __post_init__(self) -> None:
        for name in ("embeddings", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.layout is not None:
            if self.layout not in ("scface", "tinyface"):
                raise ValueError(f"layout must be scface or tinyface, got {self.layout!r}")
            if self.gallery or self.probes:
                raise ValueError("give either layout or gallery and probes lists, not both")
        elif not (self.gallery and self.probes):
            raise ValueError("give gallery and probes (CSV lists) or a layout (scface, tinyface)")
        given = (self.alpha is not None, self.beta is not None)
        if self.calibration and any(given):
            raise ValueError("give either calibration (a calibration.json) or alpha and beta")
        if not self.calibration and not all(given):
            raise ValueError(
                "QMagFace ranking needs a scorer: give calibration (a calibration.json) or both "
                "alpha and beta"
            )
        if self.shards < 0:
            raise ValueError(f"shards must be >= 0 (0: automatic), got {self.shards}")
