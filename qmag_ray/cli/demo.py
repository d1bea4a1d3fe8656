"""``qmag-ray demo``: the whole system on one machine with embedded defaults.

Synthetic faces -> embeddings with the bundled MagFace-trained demo model on a local Ray ->
calibration on one half of the identities, held-out evaluation on the other half -> MLflow
(local SQLite store) with the scorer registered as ``champion``. The steps are the ordinary
commands run in one process, so the demo exercises exactly what users run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
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


STEPS = 4


def _step(number: int, title: str) -> float:
    typer.secho(f"[{number}/{STEPS}] {title}", bold=True)
    return time.perf_counter()


def _done(started: float, what: str) -> None:
    typer.echo(f"      {what} ({time.perf_counter() - started:.1f} s)")


@contextmanager
def _logged(log: Path | None) -> Iterator[None]:
    """Everything printed (the command's report, logs, Ray's lines) goes to ``log``, redacted;
    with ``--verbose`` (``log`` None) to the terminal as usual."""
    if log is None:
        yield
        return
    from qmag_ray.cli.errors import SafeStream

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        stream = SafeStream(f, quiet=False)  # type: ignore[arg-type]
        # Ray's core worker writes some lines to the process's stderr itself, below Python.
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with redirect_stdout(stream), redirect_stderr(stream):  # type: ignore[type-var]
                try:
                    yield
                finally:
                    stream.flush()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _run(args: list[str], log: Path | None) -> None:
    """Run one qmag-ray command in this process; stop the demo when it fails."""
    with _logged(log):
        try:
            code = app(args, standalone_mode=False)
        except SystemExit as exc:
            code = exc.code
    if code not in (0, None):
        if log is not None:
            tail = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()][-3:]
            typer.echo("\n".join(tail), err=True)
        where = f"; full log: {log}" if log is not None else ""
        typer.secho(f"demo stopped: qmag-ray {args[0]} failed (exit code {code}){where}", fg="red")
        raise typer.Exit(code if isinstance(code, int) else 1)


def _last_line(log: Path | None, prefix: str) -> str:
    """The last line of ``log`` starting with ``prefix`` (a command's own summary line)."""
    if log is None or not log.exists():
        return ""
    found = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.startswith(prefix)]
    return found[-1] if found else ""


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
    from qmag_ray.cli.console import verbose
    from qmag_ray.runtime import connect_ray
    from qmag_ray.validation import Validation

    out = Path(output).resolve()
    earlier = sorted((out / "calibration").glob("run-*")) if out.exists() else []
    out.mkdir(parents=True, exist_ok=True)
    images, embeddings = out / "images", out / "embeddings"
    # A new folder per run: earlier runs (and their MLflow runs and versions) are kept.
    calibration = out / "calibration" / time.strftime("run-%Y%m%d-%H%M%S")
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    if earlier:
        typer.echo(
            f"keeping {len(earlier)} earlier run(s) in {out / 'calibration'} and "
            f"{out / 'mlflow.db'}; this run writes {calibration} (delete {out} to start over)"
        )
    logs = None if verbose() else out / "logs"

    def log(name: str) -> Path | None:
        return None if logs is None else logs / f"{name}.log"

    started = time.perf_counter()
    if logs is not None:
        typer.echo(f"qmag-ray demo: each step's full output goes to {logs}/ (--verbose: here)")

    t = _step(1, f"synthetic faces: {identities} identities x {images_per_identity} images")
    if (images / "manifest.parquet").exists():
        _done(t, f"reusing {images}")
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
            ],
            log("synth"),
        )
        _done(t, f"wrote {identities * images_per_identity} images to {images}")

    t = _step(2, f"embeddings with {arch} on Ray (starting a local Ray takes a while)")
    import ray  # noqa: F401 - imported outside the log redirection (it keeps the real stdout)

    with _logged(log("embed")):
        connect_ray(ray_address)
    if (embeddings / "summary.json").exists():
        _done(t, f"reusing {embeddings}")
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
            ],
            log("embed"),
        )
        _done(t, _last_line(log("embed"), "succeeded:") or f"wrote {embeddings}")

    t = _step(3, "calibrate on half of the identities, check on the other half, register")
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
            "--alias",
            "champion",
        ],
        log("calibrate"),
    )
    _done(t, f"report: {log('calibrate') or 'above'}")
    cal = json.loads((calibration / "calibration.json").read_text())
    typer.echo(
        f"alpha = {cal['alpha']:.6f}   beta = {cal['beta']:.6f}   ({cal['n_genuine']} genuine / "
        f"{cal['n_impostor']} impostor calibration pairs)"
    )
    validation = Validation.from_dict(cal["extra"]["validation"])
    typer.echo(validation.table())
    for note in validation.notes:
        typer.echo(f"note: {note}")

    _step(4, "champion alias")
    from qmag_ray.tracking.registry import CHAMPION, alias_version
    from qmag_ray.tracking.uri import configure_tracking

    configure_tracking(tracking_uri)
    champion = alias_version(register_as, CHAMPION)
    newest = json.loads((calibration / "calibration.json").read_text())
    if champion is None or champion.tags.get("qmag_ray.data_fingerprint") != newest.get(
        "fingerprint"
    ):
        typer.secho("this run's scorer was not registered (see the guard above)", fg="yellow")
        raise typer.Exit(1)
    with _logged(log("calibrate")):
        rho, n = norm_degradation_spearman(str(embeddings), str(images / "manifest.parquet"))
    typer.echo(f"      models:/{register_as}@{CHAMPION} -> version {champion.version}")

    typer.echo(
        f"quality check: Spearman(embedding norm, degradation) = {rho:.3f} over {n} images of "
        "identities the demo model never saw (MagFace: lower quality, smaller norm)"
    )
    from qmag_ray.workflows.groups import held_out_group_report

    try:
        with _logged(log("calibrate")):  # its loading lines belong to the log, as above
            groups = held_out_group_report(
                str(embeddings),
                str(calibration / "calibration.json"),
                "pose_band",
                str(images / "manifest.parquet"),
            )
    except ValueError as exc:  # e.g. a set made before synth wrote pose_band
        typer.echo(f"per-group report skipped: {exc}")
    else:
        typer.echo("held-out identities, " + groups.format_table())
    typer.secho(f"demo finished in {time.perf_counter() - started:.0f} s", bold=True)
    typer.echo(f"results: {calibration}/ (calibration.json, metrics.json, plots/*.png)")
    typer.echo(
        "MLflow UI: mlflow ui --backend-store-uri "
        f"{tracking_uri} --port 5000   (then open http://127.0.0.1:5000)"
    )
    typer.echo(
        "The demo data is synthetic. For real faces: qmag-ray embed --images s3://.../aligned/ "
        "--model magface_epoch_00025.pth --arch iresnet100, then calibrate on its output."
    )
