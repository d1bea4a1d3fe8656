"""Several systems in one report: score files (or MLflow runs' score files) side by side.

``compare_systems`` takes ``ScoreSet``s (``scorefiles.read_score_file``), measures FNMR@FMR
and EER with identity-bootstrap intervals, genuine/impostor statistics and d' for each, and
writes one DET plot (normal-deviate axes, intervals drawn) plus a JSON and a CSV table.
``load_sources`` turns command-line sources into score sets: a CSV score file, or an MLflow
run (``run:<id>`` or a bare 32-hex run id), whose ``scores/cosine.csv`` and
``scores/qmagface.csv`` artifacts (written by ``qmag-ray evaluate``) are both taken.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from qmag_ray import plots, storage
from qmag_ray.fmr import measurable
from qmag_ray.reports.bootstrap import BootstrapReport, distribution_stats, identity_bootstrap
from qmag_ray.reports.scorefiles import ScoreFileError, ScoreSet, read_score_file

RUN_ID = re.compile(r"^(?:run:)?([0-9a-f]{32})$")
RUN_SYSTEMS = ("cosine", "qmagface")


def _file_name(uri: str) -> str:
    parts = storage.redact(uri).rstrip("/").split("/")
    stem = parts[-1].removesuffix(".csv")
    if len(parts) >= 3 and parts[-2] == "scores":
        return f"{parts[-3]}/{stem}"
    return stem


def load_sources(sources: list[str], names: list[str] | None = None) -> list[ScoreSet]:
    """Score sets of each source, in order (a run gives two: cosine and QMagFace).

    Raises:
        ScoreFileError: a file that cannot be read, a run without score files, or names that
            do not match the sources.
    """
    if names and len(names) != len(sources):
        raise ScoreFileError(
            f"--name was given {len(names)} time(s) for {len(sources)} source(s); give one "
            "name per source or none"
        )
    out: list[ScoreSet] = []
    for k, src in enumerate(sources):
        label = names[k] if names else None
        run = RUN_ID.match(src.strip())
        if run:
            out += _run_sets(run.group(1), label)
        else:
            out.append(read_score_file(src, label or _file_name(src)))
    seen: set[str] = set()
    for s in out:
        if s.name in seen:
            raise ScoreFileError(f"two systems are both named {s.name!r}: give --name per source")
        seen.add(s.name)
    return out


def _run_sets(run_id: str, label: str | None) -> list[ScoreSet]:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="scores", dst_path=tmp
            )
        except Exception as exc:  # noqa: BLE001 - reported with the run named
            raise ScoreFileError(
                f"run {run_id}: no score files (artifact 'scores/', written by qmag-ray "
                f"evaluate) could be read: {exc}"
            ) from None
        sets = []
        for system in RUN_SYSTEMS:
            path = Path(local) / f"{system}.csv"
            if path.exists():
                name = f"{label or run_id[:8]}/{system}"
                sets.append(read_score_file(str(path), name))
        if not sets:
            raise ScoreFileError(f"run {run_id} has no scores/cosine.csv or scores/qmagface.csv")
        return sets


@dataclass(frozen=True)
class SystemSummary:
    """One system's figures in a comparison."""

    name: str
    source: str
    n_genuine: int
    n_impostor: int
    bootstrap: BootstrapReport
    distribution: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "n_genuine": self.n_genuine,
            "n_impostor": self.n_impostor,
            "bootstrap": self.bootstrap.to_dict(),
            "distribution": self.distribution,
        }


@dataclass(frozen=True)
class Comparison:
    """Every system's summary and the files written."""

    systems: list[SystemSummary]
    fmrs: list[str]
    files: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"fmrs": self.fmrs, "systems": [s.to_dict() for s in self.systems]}

    def table(self) -> pd.DataFrame:
        rows = []
        for s in self.systems:
            row: dict[str, Any] = {
                "system": s.name,
                "genuine": s.n_genuine,
                "impostor": s.n_impostor,
            }
            for key in self.fmrs:
                iv = s.bootstrap.fnmr_at_fmr.get(key)
                row[f"fnmr@{key}"] = None if iv is None else iv.value
                row[f"fnmr@{key}_low"] = None if iv is None else iv.low
                row[f"fnmr@{key}_high"] = None if iv is None else iv.high
            row.update(
                {
                    "eer": s.bootstrap.eer.value,
                    "eer_low": s.bootstrap.eer.low,
                    "eer_high": s.bootstrap.eer.high,
                    **s.distribution,
                }
            )
            rows.append(row)
        return pd.DataFrame(rows)

    def format_table(self) -> str:
        level = self.systems[0].bootstrap.level if self.systems else 0.95
        width = max([len(s.name) for s in self.systems] + [6])
        head = f"{'system':<{width}}" + "".join(f"  {'FNMR % @ ' + k:>26}" for k in self.fmrs)
        head += f"  {'EER %':>26}  {'d-prime':>8}"
        lines = [f"{level:.0%} identity-bootstrap intervals in brackets", head]
        for s in self.systems:
            found = s.bootstrap.fnmr_at_fmr
            cells = "".join(
                f"  {found[k].format_pct() if k in found else '-':>26}" for k in self.fmrs
            )
            d = s.distribution.get("d_prime")
            lines.append(
                f"{s.name:<{width}}{cells}  {s.bootstrap.eer.format_pct():>26}  "
                f"{'-' if d is None else format(d, '.3f'):>8}"
            )
        return "\n".join(lines)


def compare_systems(
    sets: list[ScoreSet],
    output: str,
    *,
    fmrs: tuple[float, ...] = (1e-2, 1e-3, 1e-4),
    replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Figures, one DET plot (``det.png``) and tables (``compare.json``, ``compare.csv``)."""
    from qmag_ray.calibration.result import fmr_key
    from qmag_ray.workflows.reporting import write_csv, write_json

    if not sets:
        raise ScoreFileError("compare needs at least one score file or run")
    summaries = []
    for s in sets:
        n_imp = int((s.labels == 0).sum())
        n_gen = int((s.labels == 1).sum())
        if n_gen == 0 or n_imp == 0:
            raise ScoreFileError(
                f"{s.source}: needs genuine and impostor pairs ({n_gen} / {n_imp})"
            )
        usable = tuple(f for f in fmrs if measurable(f, n_imp))
        boot = identity_bootstrap(
            s.scores,
            s.labels,
            s.id_a,
            s.id_b,
            usable,
            replicates=max(replicates, 1),
            level=level,
            seed=seed,
        )
        summaries.append(
            SystemSummary(
                s.name, s.source, n_gen, n_imp, boot, distribution_stats(s.scores, s.labels)
            )
        )
    keys = [fmr_key(f) for f in fmrs]
    keys = [k for k in keys if any(k in x.bootstrap.fnmr_at_fmr for x in summaries)]
    files: dict[str, str] = {}
    comparison = Comparison(summaries, keys, files)
    files["det.png"] = plots.det_curves(
        storage.join(output, "det.png"),
        {s.name: s.scores for s in sets},
        {s.name: s.labels for s in sets},
        intervals={x.name: x.bootstrap.to_dict() for x in summaries},
        title=f"DET of {len(sets)} systems (bars: {level:.0%} identity-bootstrap intervals)",
    )
    files["compare.json"] = write_json(storage.join(output, "compare.json"), comparison.to_dict())
    files["compare.csv"] = write_csv(storage.join(output, "compare.csv"), comparison.table())
    return comparison


__all__ = ["Comparison", "compare_systems", "load_sources"]
