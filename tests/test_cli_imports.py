"""The command line imports no heavy dependency until a command runs (issue 10).

A bad configuration must be refused in the time it takes to read it: importing Ray, torch or
MLflow at start-up cost seconds before the first check. Each case runs in a fresh interpreter
(this test session has long imported all three) and reads ``sys.modules`` there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

HEAVY = ("ray", "torch", "mlflow")


def _loaded_after(code: str) -> dict[str, bool]:
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_app_object_imports_no_ray_torch_or_mlflow() -> None:
    assert _loaded_after("import qmag_ray.cli.app") == dict.fromkeys(HEAVY, False)


def test_importing_the_whole_command_line_imports_no_ray_torch_or_mlflow() -> None:
    # qmag_ray.cli registers every command: what `qmag-ray ...` loads before it parses argv
    assert _loaded_after("import qmag_ray.cli") == dict.fromkeys(HEAVY, False)


def test_a_bad_recalibration_yaml_is_refused_without_importing_ray_torch_or_mlflow(
    tmp_path: Path,
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "images": str(tmp_path / "images"),
                "embeddings": str(tmp_path / "emb"),
                "model": str(tmp_path / "model.pth"),
                "arch": "iresnet-demo",
                "output": str(tmp_path / "runs"),
                "holdout": {"embeddings": "h", "pairs": "p.csv"},
                "method": "sigmoid",
                "embed": {"actors": -3},
            }
        )
    )
    loaded = _loaded_after(
        f"""
        import contextlib, io
        from qmag_ray.cli import app
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                app(["recalibrate", "--config", {str(config)!r}])
            except SystemExit as exc:
                code = exc.code
        text = err.getvalue()
        assert code == 2, (code, text)
        assert "method (--method)" in text and "embed.actors (--actors)" in text, text
        """
    )
    assert loaded == dict.fromkeys(HEAVY, False)
