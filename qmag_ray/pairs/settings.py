"""Settings of the pair stage: which pairs (a list, generated or exhaustive) and how pair names
map onto embeddings. Composed into the calibrate, evaluate and recalibrate settings."""

from __future__ import annotations

from enum import Enum

from qmag_ray.config import Settings, option, section, settings
from qmag_ray.pairs.protocols import PairProtocol
from qmag_ray.pairs.resolve import Match, Policy

_POLICY = "error or skip (skipped items are counted and reported)"


class Pooling(str, Enum):
    """How image features are pooled into media and templates."""

    QUALITY = "quality"
    MEAN = "mean"


class ValidationMode(str, Enum):
    """How the held-out side is formed.

    ``auto``: ``pairs`` when a validation pair list is given, else ``split`` when every
    embedding has an identity label, else ``none`` (with a warning in the outcome).
    """

    AUTO = "auto"
    SPLIT = "split"
    PAIRS = "pairs"
    NONE = "none"


class PairMode(str, Enum):
    """Where the calibration pairs come from; ``auto``: a pair list if given, else generated."""

    AUTO = "auto"
    LISTED = "listed"
    GENERATE = "generate"
    EXHAUSTIVE = "exhaustive"


@settings
class GenerateConfig(Settings):
    """Pairs generated from identity labels (spec section 5)."""

    seed: int = option(0, "Generated pairs: seed (the same seed gives the same pairs).")
    max_per_identity: int = option(10, "Generated pairs: images used per identity.", ge=2)
    impostors_per_side: int = option(
        5, "Generated pairs: impostors drawn per image of a genuine pair.", ge=1
    )


@settings
class ExhaustiveConfig(Settings):
    """Every pair of the (fit-side) embeddings, scored block-wise as matrix products."""

    block_size: int = option(4096, "Exhaustive pairs: embeddings per block.", ge=2)


@settings
class EmbeddingPolicy(Settings):
    """What to do with unusable embeddings."""

    on_bad: Policy = option(Policy.ERROR, f"NaN/inf/all-zero embeddings: {_POLICY}.")


@settings
class PathMatching(Settings):
    """How names in a list (pairs, gallery, probes) map onto the embeddings' ``path``."""

    prefix: str = option("", "Prefix joined onto listed names to form embedding paths.")
    match: Match = option(
        Match.EXACT, "Match listed names to embedding paths exactly or by suffix."
    )


@settings
class TemplatePooling(Settings):
    """How image embeddings are pooled into templates."""

    pooling: Pooling = option(
        Pooling.QUALITY,
        "Template pooling, per media then per template: quality (quality-weighted) or mean.",
    )


@settings
class PairListSettings(EmbeddingPolicy, PathMatching, TemplatePooling):
    """A pair list, how its names map onto the embeddings' ``path`` column, what to skip."""

    pairs: str | None = option(
        None, "Pair list: a benchmark pair file or CSV/Parquet with columns a, b, label."
    )
    protocol: PairProtocol | None = option(
        None, "Format of the pair list (default: guessed from the file name)."
    )
    templates: str | None = option(
        None,
        "Template table (IJB *_face_tid_mid.txt, or CSV path, template, media): pool the "
        "embeddings into templates; --pairs then names templates.",
    )
    on_missing: Policy = option(
        Policy.ERROR, f"Pairs naming images not in the embeddings: {_POLICY}."
    )
    on_self: Policy = option(Policy.ERROR, f"Self-pairs (an image paired with itself): {_POLICY}.")
    on_duplicate: Policy = option(Policy.ERROR, f"Repeated pairs: {_POLICY}.")

    def check(self) -> None:
        proto = self.protocol
        if proto is not None and proto.is_template and not self.templates:
            raise ValueError(
                f"protocol {proto.value} compares templates: give `templates` (the "
                "*_face_tid_mid.txt or a CSV path, template, media)"
            )
        if (
            self.templates
            and proto is not None
            and not (proto.is_template or proto is PairProtocol.GENERIC)
        ):
            raise ValueError(
                f"`templates` were given with the image protocol {proto.value}; use protocol "
                "ijbb, ijbc or generic (a CSV a, b, label naming templates)"
            )


@settings
class PairGeneration(Settings):
    """Pairs made from identity labels: generated (sampled) or exhaustive."""

    pair_mode: PairMode = option(
        PairMode.AUTO,
        "Calibration pairs: listed (--pairs), generate (from identity labels), exhaustive "
        "(every pair, scored block-wise) or auto (listed if --pairs is given, else generate).",
    )
    generate: GenerateConfig = section(GenerateConfig, "Generated pairs.")
    exhaustive: ExhaustiveConfig = section(ExhaustiveConfig, "Exhaustive pairs.")
