"""``qmag-ray calibrate``: fit QMagFace's alpha and beta on Ray, validate, record, register."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.pairs.protocols import PairProtocol
from qmag_ray.pairs.resolve import Match
from qmag_ray.workflows.config import PairMode, ValidationMode

logger = logging.getLogger(__name__)


def _pair_mode(generate_pairs: bool, exhaustive: bool) -> PairMode | None:
    if generate_pairs and exhaustive:
        from qmag_ray.cli._support import fail

        fail("give at most one of --generate-pairs and --exhaustive")
    if generate_pairs:
        return PairMode.GENERATE
    return PairMode.EXHAUSTIVE if exhaustive else None


@app.command()
def calibrate(
    embeddings: Annotated[
        str | None,
        typer.Option(
            help="Embeddings: an embed job's output folder, its embeddings/ or a Parquet file."
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(help="Folder or URI for calibration.json, metrics.json, tables and plots."),
    ] = None,
    pairs: Annotated[
        str | None,
        typer.Option(
            help="Calibration pair list: a benchmark file or CSV/Parquet with a, b, label."
        ),
    ] = None,
    protocol: Annotated[
        PairProtocol | None,
        typer.Option(help="Format of --pairs (default: guessed from the file name)."),
    ] = None,
    generate_pairs: Annotated[
        bool,
        typer.Option(help="Generate pairs from identity labels (the default without --pairs)."),
    ] = False,
    exhaustive: Annotated[
        bool, typer.Option(help="Use every pair of the embeddings, scored block-wise.")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of generated pairs (default 0).")] = None,
    max_per_identity: Annotated[
        int | None, typer.Option(min=2, help="Generated pairs: images per identity (default 10).")
    ] = None,
    impostors_per_side: Annotated[
        int | None,
        typer.Option(
            min=1, help="Generated pairs: impostors per image of a genuine pair (default 5)."
        ),
    ] = None,
    block_size: Annotated[
        int | None, typer.Option(min=2, help="Exhaustive pairs: rows per block (default 4096).")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(help="Prefix joined onto pair names to form embedding paths.")
    ] = None,
    match: Annotated[
        Match | None, typer.Option(help="Match pair names to paths exactly or by path suffix.")
    ] = None,
    n_fmr: Annotated[int | None, typer.Option(min=2, help="FMR grid points (default 50).")] = None,
    fmr_min: Annotated[
        float | None,
        typer.Option(
            help="Smallest grid FMR (default 1e-5, raised with a note to what the impostor "
            "pairs measure, 1/N, when they cannot measure 1e-5; a given value is kept or refused)."
        ),
    ] = None,
    fmr_max: Annotated[float | None, typer.Option(help="Largest grid FMR (default 1e-2).")] = None,
    n_weights: Annotated[
        int | None, typer.Option(min=1, help="Candidate quality weights (default 20).")
    ] = None,
    max_ratio: Annotated[
        float | None, typer.Option(help="Weights span +-max_ratio / max quality (default 0.5).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="Calibration method: paper (the published algorithm; default), raw (same "
            "search, thresholds on the raw adjusted score) or direct (alpha, beta chosen for "
            "the mean log FNMR over the grid's FMRs)."
        ),
    ] = None,
    compare_methods: Annotated[
        bool | None,
        typer.Option(
            "--compare-methods/--no-compare-methods",
            help="Also fit every other method and report all of them on the held-out side "
            "(console table, calibration.json, MLflow); the guard applies to --method.",
        ),
    ] = None,
    validation: Annotated[
        ValidationMode | None,
        typer.Option(
            help="Held-out check: split (identity-disjoint), pairs (--validation-pairs), none, "
            "or auto (pairs if given, else split when identities exist)."
        ),
    ] = None,
    validation_fraction: Annotated[
        float | None, typer.Option(help="Split: share of identities to fit on (default 0.5).")
    ] = None,
    validation_seed: Annotated[
        int | None, typer.Option(help="Split: seed of the identity split (default 0).")
    ] = None,
    validation_pairs: Annotated[
        str | None, typer.Option(help="Held-out pair list for --validation pairs.")
    ] = None,
    validation_protocol: Annotated[
        PairProtocol | None, typer.Option(help="Format of --validation-pairs.")
    ] = None,
    validation_embeddings: Annotated[
        str | None,
        typer.Option(help="Embeddings of --validation-pairs (default: --embeddings)."),
    ] = None,
    guard_tolerance: Annotated[
        float | None,
        typer.Option(help="Guard: relative FNMR excess over cosine allowed (default 0.05)."),
    ] = None,
    guard_abs_tolerance: Annotated[
        float | None,
        typer.Option(help="Guard: absolute FNMR excess allowed (default 0.0005)."),
    ] = None,
    guard_min_false_matches: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Guard: judge a target FMR only where FMR x held-out impostors reaches this "
            "(default 10).",
        ),
    ] = None,
    shards: Annotated[
        int | None, typer.Option(min=0, help="Pair shards (Ray tasks); 0: two per CPU.")
    ] = None,
    quality_column: opts.QualityColumn = None,
    quality_file: opts.QualityFile = None,
    on_missing: opts.OnMissing = None,
    on_bad: opts.OnBad = None,
    on_self: opts.OnSelf = None,
    on_duplicate: opts.OnDuplicate = None,
    allow_incomplete: opts.AllowIncomplete = None,
    templates: opts.Templates = None,
    pooling: opts.PoolingRule = None,
    tracking_uri: opts.TrackingUri = None,
    experiment: opts.Experiment = None,
    register_as: Annotated[
        str | None, typer.Option(help="Registered model name of the scorer (default qmagface).")
    ] = None,
    register: Annotated[
        bool | None,
        typer.Option("--register/--no-register", help="Register the scorer (default: yes)."),
    ] = None,
    ray_address: opts.RayAddress = None,
    config: Annotated[
        str | None,
        typer.Option(help="YAML config (see CalibrateConfig); command-line options override it."),
    ] = None,
) -> None:
    """Fit alpha and beta on Ray, check them on held-out identities, record and register."""
    from qmag_ray.cli import _support as support
    from qmag_ray.workflows.config import CalibrateConfig

    given: dict[str, Any] = {
        "embeddings": embeddings,
        "output": output,
        "pairs": pairs,
        "protocol": protocol,
        "pair_mode": _pair_mode(generate_pairs, exhaustive),
        "generate.seed": seed,
        "generate.max_per_identity": max_per_identity,
        "generate.impostors_per_side": impostors_per_side,
        "exhaustive.block_size": block_size,
        "prefix": prefix,
        "match": match,
        "grid.n_fmr": n_fmr,
        "grid.fmr_min": fmr_min,
        "grid.fmr_max": fmr_max,
        "grid.n_weights": n_weights,
        "grid.max_ratio": max_ratio,
        "method": method,
        "compare_methods": compare_methods,
        "validation.mode": validation,
        "validation.fraction": validation_fraction,
        "validation.seed": validation_seed,
        "validation.pairs": validation_pairs,
        "validation.protocol": validation_protocol,
        "validation.embeddings": validation_embeddings,
        "validation.tolerance": guard_tolerance,
        "validation.abs_tolerance": guard_abs_tolerance,
        "validation.min_false_matches": guard_min_false_matches,
        "shards": shards,
        "on_missing": on_missing,
        "on_bad": on_bad,
        "on_self": on_self,
        "on_duplicate": on_duplicate,
        "allow_incomplete": allow_incomplete,
        "templates": templates,
        "pooling": pooling,
        "tracking.tracking_uri": tracking_uri,
        "tracking.experiment": experiment,
        "quality.column": quality_column,
        "quality.file": quality_file,
        "tracking.register_as": register_as,
        "tracking.register": register,
    }
    cfg = support.load(CalibrateConfig, config, {k: _plain(v) for k, v in given.items()})
    support.require_exists(
        embeddings=cfg.embeddings,
        pairs=cfg.pairs,
        validation_pairs=cfg.validation.pairs,
        templates=cfg.templates,
        validation_embeddings=cfg.validation.embeddings,
        **{"--quality-file": cfg.quality.file},
    )
    uri = support.prepare_tracking(cfg.tracking.tracking_uri)
    held = support.take_output_lease(cfg.output, "calibrate")
    address = support.connect(ray_address)
    from qmag_ray.workflows.calibrate import run_calibration

    outcome = support.guarded("calibrate", lambda: run_calibration(cfg))
    typer.echo("")
    typer.echo(outcome.summary())
    support.still_held(held)
    with support.tracking_errors(uri, cfg.output):
        _record(outcome, cfg, address)


def verdict_name(passed: bool | None) -> str:
    """The guard verdict as a tag value."""
    return {True: "passed", False: "failed", None: "not_evaluated"}[passed]


def _plain(value: Any) -> Any:
    """Enum choices as their text (the config loader parses them again)."""
    return value.value if hasattr(value, "value") else value


def _record(outcome: Any, cfg: Any, address: str) -> None:
    """Log the run (params, metrics, artifacts, tags) and register the scorer if allowed."""
    from qmag_ray.cli._support import log_files
    from qmag_ray.tracking.registry import register_scorer
    from qmag_ray.tracking.runs import tracked_run

    cal = outcome.calibration
    guard = outcome.validation["guard"]
    verdict = verdict_name(guard["passed"])
    tags = {
        "qmag_ray.guard": verdict,
        "qmag_ray.guard_reasons": "\n".join(guard["reasons"]),
        "qmag_ray.validation": outcome.validation["mode"],
        "qmag_ray.data_fingerprint": cal.fingerprint,
        "qmag_ray.method": cal.method,
    }
    compared = outcome.validation.get("methods")
    if compared and compared.get("guard"):
        tags["qmag_ray.methods_guard"] = ", ".join(
            f"{m}: {verdict_name(compared['guard'][m])}" for m in compared["methods"]
        )
    with tracked_run(
        kind="calibrate", experiment=cfg.tracking.experiment, ray_address=address, tags=tags
    ) as run:
        params = {k: v for k, v in outcome.params.items() if k not in ("grid", "method")}
        run.log_params(params)
        run.log_calibration(cal)  # calibration.json, grid_table.csv, grid params, alpha, beta
        done = {"alpha", "beta", "n_genuine", "n_impostor"}
        run.log_metrics({k: v for k, v in outcome.tracking_metrics().items() if k not in done})
        log_files(run, outcome.files, skip=("calibration.json", "grid_table.csv"))
        typer.echo(f"mlflow: run {run.run_id} in experiment {cfg.tracking.experiment!r}")
        if not cfg.tracking.register:
            typer.echo("registry: not registered (--no-register)")
        elif guard["passed"] is False:
            typer.echo(
                f"registry: NOT registered as a champion candidate: on held-out pairs the fitted "
                f"scorer (method {cal.method}) is worse than plain cosine (guard failed; see the "
                "table above). The run and its calibration.json are recorded for inspection."
            )
            passing = [m for m, ok in (compared or {}).get("guard", {}).items() if ok]
            if passing:
                typer.echo(f"registry: method(s) passing the guard here: {', '.join(passing)}")
            run.set_tags({"qmag_ray.registered": "false (guard failed)"})
        else:
            version = register_scorer(
                cal,
                model_name=cfg.tracking.register_as,
                tags={"qmag_ray.guard": verdict, "qmag_ray.run_id": run.run_id},
            )
            run.set_tags({"qmag_ray.registered": f"{cfg.tracking.register_as}/{version.version}"})
            caveat = "" if guard["passed"] else " (not checked on held-out pairs)"
            typer.echo(f"registry: {cfg.tracking.register_as} version {version.version}{caveat}")
