"""``qmag-ray evaluate``: cosine against QMagFace on a benchmark protocol or pair list."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app
from qmag_ray.pairs.protocols import PairProtocol
from qmag_ray.pairs.resolve import Match

logger = logging.getLogger(__name__)


@app.command()
def evaluate(
    embeddings: Annotated[
        str | None,
        typer.Option(
            help="Embeddings: an embed job's output folder, its embeddings/ or a Parquet file."
        ),
    ] = None,
    pairs: Annotated[
        str | None,
        typer.Option(help="Pair file: a benchmark list or CSV/Parquet with a, b, label."),
    ] = None,
    protocol: Annotated[
        PairProtocol | None,
        typer.Option(help="Format of --pairs (default: guessed from the file name)."),
    ] = None,
    calibration: Annotated[
        str | None, typer.Option(help="calibration.json of a calibrate run (or --alpha/--beta).")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="QMagFace alpha (with --beta).")] = None,
    beta: Annotated[float | None, typer.Option(help="QMagFace beta (with --alpha).")] = None,
    output: Annotated[
        str | None, typer.Option(help="Folder or URI for metrics.json and plots.")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(help="Prefix joined onto pair names to form embedding paths.")
    ] = None,
    match: Annotated[
        Match | None, typer.Option(help="Match pair names to paths exactly or by path suffix.")
    ] = None,
    edc_fmr: Annotated[
        float | None, typer.Option(help="FMR of the error-versus-discard curve (default 1e-3).")
    ] = None,
    quality_column: opts.QualityColumn = None,
    quality_file: opts.QualityFile = None,
    edc_quality: Annotated[
        list[str] | None,
        typer.Option(
            help="Quality measures compared in the error-versus-discard evaluation (repeat the "
            "option; columns of the embeddings or --quality-file; default: --quality-column)."
        ),
    ] = None,
    bootstrap: Annotated[
        int | None,
        typer.Option(help="Identity-bootstrap replicates for FNMR@FMR/EER intervals (0: none)."),
    ] = None,
    group_column: Annotated[
        list[str] | None,
        typer.Option(
            help="Report per group of this column (repeatable; a column of the embeddings or "
            "--group-file): quality, FNMR and FMR at the global threshold, max/min ratio."
        ),
    ] = None,
    group_file: Annotated[
        str | None, typer.Option(help="CSV/Parquet file with 'path' and the --group-column(s).")
    ] = None,
    score_files: Annotated[
        bool | None,
        typer.Option(help="Write per-pair score files (bob.bio CSV) under scores/ (default on)."),
    ] = None,
    on_missing: opts.OnMissing = None,
    on_bad: opts.OnBad = None,
    on_self: opts.OnSelf = None,
    on_duplicate: opts.OnDuplicate = None,
    allow_incomplete: opts.AllowIncomplete = None,
    allow_other_model: opts.AllowOtherModel = None,
    templates: opts.Templates = None,
    pooling: opts.PoolingRule = None,
    tracking_uri: opts.TrackingUri = None,
    experiment: opts.Experiment = None,
    ray_address: opts.RayAddress = None,
    config: Annotated[
        str | None,
        typer.Option(help="YAML config (see EvaluateConfig); command-line options override it."),
    ] = None,
) -> None:
    """Compare cosine and QMagFace on a pair protocol: metrics.json, plots, a table, MLflow."""
    from qmag_ray.cli import _support as support
    from qmag_ray.workflows.config import EvaluateConfig

    given: dict[str, Any] = {
        "embeddings": embeddings,
        "pairs": pairs,
        "protocol": protocol,
        "calibration": calibration,
        "alpha": alpha,
        "beta": beta,
        "output": output,
        "prefix": prefix,
        "match": match,
        "edc_fmr": edc_fmr,
        "on_missing": on_missing,
        "on_bad": on_bad,
        "on_self": on_self,
        "on_duplicate": on_duplicate,
        "allow_incomplete": allow_incomplete,
        "allow_other_model": allow_other_model,
        "templates": templates,
        "pooling": pooling,
        "tracking.tracking_uri": tracking_uri,
        "tracking.experiment": experiment,
        "quality.column": quality_column,
        "quality.file": quality_file,
        "quality.compare": edc_quality or None,
        "report.bootstrap": bootstrap,
        "report.groups": group_column or None,
        "report.group_file": group_file,
        "report.score_files": score_files,
    }
    plain = {k: (v.value if hasattr(v, "value") else v) for k, v in given.items()}
    cfg = support.load(EvaluateConfig, config, plain)
    support.require_exists(
        embeddings=cfg.embeddings,
        pairs=cfg.pairs,
        calibration=cfg.calibration,
        **{"--quality-file": cfg.quality.file, "--group-file": cfg.report.group_file},
        templates=cfg.templates,
    )
    uri = support.prepare_tracking(cfg.tracking.tracking_uri)
    address = support.connect(ray_address)
    from qmag_ray.workflows.evaluate import run_evaluation

    outcome = support.guarded("evaluate", lambda: run_evaluation(cfg))
    typer.echo("")
    typer.echo(outcome.summary())
    with support.tracking_errors(uri, cfg.output):
        _record(outcome, cfg, address)


def _record(outcome: Any, cfg: Any, address: str) -> None:
    from qmag_ray.cli._support import log_files
    from qmag_ray.tracking.runs import tracked_run

    tags = {
        "qmag_ray.protocol": outcome.pairs["protocol"],
        "qmag_ray.pairs_skipped": str(outcome.pairs["resolve"]["skipped"]),
    }
    with tracked_run(
        kind="evaluate", experiment=cfg.tracking.experiment, ray_address=address, tags=tags
    ) as run:
        run.log_params(outcome.params)
        run.log_metrics(outcome.tracking_metrics())
        log_files(run, outcome.files)
        typer.echo(f"mlflow: run {run.run_id} in experiment {cfg.tracking.experiment!r}")
