"""``qmag-ray compare``: several score files or MLflow runs in one DET plot and one table."""

from __future__ import annotations

from typing import Annotated

import typer

from qmag_ray.cli import options as opts
from qmag_ray.cli.app import app


@app.command()
def compare(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Score files (bob.bio CSV, e.g. an evaluation's scores/qmagface.csv) or MLflow "
            "run ids (run:<id>; both of a run's score files are taken)."
        ),
    ],
    output: Annotated[str, typer.Option(help="Folder or URI for det.png, compare.json/csv.")],
    name: Annotated[
        list[str] | None, typer.Option(help="Display name per source, in order (repeat).")
    ] = None,
    fmr: Annotated[
        list[float] | None, typer.Option(help="FMRs of the table (repeat; default 1e-2 1e-3 1e-4).")
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(help="Identity-bootstrap replicates for the intervals.")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    tracking_uri: opts.TrackingUri = None,
) -> None:
    """Compare systems: FNMR@FMR and EER with 95% intervals, d', one DET plot."""
    from qmag_ray.cli import _support as support
    from qmag_ray.reports.compare import RUN_ID, compare_systems, load_sources

    if bootstrap < 1:
        support.fail("--bootstrap must be at least 1")
    for src in sources:
        if not RUN_ID.match(src.strip()):
            support.require_exists(**{"score file": src})
    if any(RUN_ID.match(s.strip()) for s in sources):
        support.prepare_tracking(tracking_uri)
    sets = support.guarded("compare", lambda: load_sources(list(sources), name))
    fmrs = tuple(fmr) if fmr else (1e-2, 1e-3, 1e-4)
    result = support.guarded(
        "compare", lambda: compare_systems(sets, output, fmrs=fmrs, replicates=bootstrap, seed=seed)
    )
    typer.echo(result.format_table())
    for key, uri in result.files.items():
        typer.echo(f"{key}: {uri}")
