"""``qmag-ray demo``: the whole system on one machine with embedded defaults.

Synthetic faces -> embeddings with the bundled MagFace-trained demo model on a local Ray ->
calibration on one half of the identities, held-out evaluation on the other half -> MLflow
(local SQLite store) with the scorer registered as ``champion``. The steps are the ordinary
commands run in one process, so the demo exercises exactly what users run.
"""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import typer

from qmag_ray.cli.app import app

#: The bundled demo backbone (trained with ``qmag-ray train`` on synthetic faces of seed 1).
DEMO_ARCH = "iresnet-demo"
#: The demo set's seed: 2, so its identities never overlap the demo model's training set.
DEMO_SEED = 2


def demo_checkpoint() -> str:
    """Path of the demo model shipped in the package."""
    return str(files("qmag_ray") / "assets" / "demo_iresnet.pth")


def norm_degradation_spearman(embeddings: str, manifest: str) -> tuple[float, int]:
    """Spearman correlation of embedding norm and synthetic degradation, joined by path."""
    import pandas as pd
    from scipy.stats import spearmanr

    from qmag_ray.embeddings import load_embeddings

    table = load_embeddings(embeddings)
    norms = pd.Series(table.quality, index=table.path, name="quality")
    levels = pd.read_parquet(manifest, columns=["path", "degradation"]).set_index("path")
    joined = levels.join(norms, how="inner")
    rho = spearmanr(joined["quality"], joined["degradation"]).statistic
    return float(rho), len(joined)


def _step(number: int, title: str) -> float:
    typer.secho(f"\n== step {number}/4: {title}", bold=True)
    return time.perf_counter()


def _run(args: list[str]) -> None:
    """Run one qmag-ray command in this process; stop the demo when it fails."""
    try:
        code = app(args, standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
    if code not in (0, None):
        typer.secho(f"demo stopped: qmag-ray {args[0]} failed (exit code {code})", fg="red")
        raise typer.Exit(code if isinstance(code, int) else 1)


@app.command()
def demo(
    output: Annotated[
        str, typer.Option(help="Folder for everything the demo writes.")
    ] = "demo-out",
    identities: Annotated[
        int, typer.Option(min=20, help="Synthetic identities (half calibrate, half evaluate).")
    ] = 400,
    images_per_identity: Annotated[
        int, typer.Option(min=2, help="Images per synthetic identity.")
    ] = 10,
    model: Annotated[
        str | None,
        typer.Option(help="MagFace checkpoint (default: the bundled demo model)."),
    ] = None,
    arch: Annotated[str, typer.Option(help="Backbone of --model.")] = DEMO_ARCH,
    register_as: Annotated[str, typer.Option(help="Registered model name.")] = "qmagface",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")
    ] = None,
) -> None:
    """Run the demo end to end: synth, embed, calibrate + held-out evaluation, register."""
    from qmag_ray.runtime import connect_ray

    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    images, embeddings, calibration = out / "images", out / "embeddings", out / "calibration"
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    started = time.perf_counter()

    t = _step(1, f"synthetic faces ({identities} identities x {images_per_identity} images)")
    if (images / "manifest.parquet").exists():
        typer.echo(f"reusing {images}")
    else:
        _run(
            [
                "synth",
                "--output",
                str(images),
                "--identities",
                str(identities),
                "--images-per-identity",
                str(images_per_identity),
                "--seed",
                str(DEMO_SEED),
            ]
        )
    typer.echo(f"step 1 took {time.perf_counter() - t:.1f} s")

    connect_ray(ray_address)
    t = _step(2, f"embeddings with {arch} on Ray")
    if (embeddings / "summary.json").exists():
        typer.echo(f"reusing {embeddings}")
    else:
        _run(
            [
                "embed",
                "--images",
                str(images),
                "--model",
                model or demo_checkpoint(),
                "--arch",
                arch,
                "--output",
                str(embeddings),
            ]
        )
    typer.echo(f"step 2 took {time.perf_counter() - t:.1f} s")

    t = _step(3, "calibrate on half of the identities, evaluate on the other half, register")
    # The documented defaults: where the pairs cannot measure FMR 1e-5, the grid starts at
    # the smallest FMR they do measure, and the report says so.
    _run(
        [
            "calibrate",
            "--embeddings",
            str(embeddings),
            "--generate-pairs",
            "--validation",
            "split",
            "--output",
            str(calibration),
            "--tracking-uri",
            tracking_uri,
            "--register-as",
            register_as,
        ]
    )
    typer.echo(f"step 3 took {time.perf_counter() - t:.1f} s")

    _step(4, "champion alias")
    from qmag_ray.tracking.registry import client, set_alias
    from qmag_ray.tracking.uri import configure_tracking

    configure_tracking(tracking_uri)
    versions = client().search_model_versions(f"name = '{register_as}'")
    if not versions:
        typer.secho("no scorer was registered (see the guard above): no champion set", fg="yellow")
        raise typer.Exit(1)
    newest = max(versions, key=lambda v: int(v.version))
    set_alias(register_as, "champion", str(newest.version))
    typer.echo(f"models:/{register_as}@champion -> version {newest.version}")

    rho, n = norm_degradation_spearman(str(embeddings), str(images / "manifest.parquet"))
    typer.echo(
        f"quality check: Spearman(embedding norm, degradation) = {rho:.3f} over {n} images of "
        "identities the demo model never saw (MagFace: lower quality, smaller norm)"
    )

    plots = sorted(str(p) for p in calibration.rglob("*.png"))
    typer.secho(f"\ndemo finished in {time.perf_counter() - started:.0f} s", bold=True)
    typer.echo("plots:\n  " + "\n  ".join(plots))
    typer.echo(f"results: {calibration / 'calibration.json'}, {calibration / 'metrics.json'}")
    typer.echo(
        "MLflow UI: mlflow ui --backend-store-uri "
        f"{tracking_uri} --port 5000   (then open http://127.0.0.1:5000)"
    )
    typer.echo(
        "The demo data is synthetic. For real faces: qmag-ray embed --images s3://.../aligned/ "
        "--model magface_epoch_00025.pth --arch iresnet100, then calibrate on its output."
    )
