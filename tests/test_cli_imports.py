"""The command line imports no heavy dependency until a command runs (issue 10).

A bad configuration must be refused in the time it takes to read it: importing Ray, torch or
MLflow at start-up cost seconds before the first check. Each case runs in a fresh interpreter
(this test session has long imported all three) and reads ``sys.modules`` there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fresh_interpreter import modules_loaded_after

HEAVY = ("ray", "torch", "mlflow")


def _loaded_after(code: str) -> dict[str, bool]:
    return modules_loaded_after(code, HEAVY)


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


def test_packages_resolve_their_public_names_on_first_use() -> None:
    behind = ("qmag_ray.calibration.fit", "qmag_ray.embedding.job", "qmag_ray.training.magface")
    behind += ("qmag_ray.workflows.calibrate",)
    code = "import qmag_ray, qmag_ray.embedding, qmag_ray.training, qmag_ray.workflows"
    assert modules_loaded_after(code, behind) == dict.fromkeys(behind, False)
    code += "\nfrom qmag_ray.embedding import run_embed"
    assert modules_loaded_after(code, behind)["qmag_ray.embedding.job"] is True

    import qmag_ray.training
    import qmag_ray.workflows
    from qmag_ray.workflows import config

    assert qmag_ray.workflows.CalibrateConfig is config.CalibrateConfig
    with pytest.raises(AttributeError, match="module 'qmag_ray.training' has no attribute 'x'"):
        _ = qmag_ray.training.x
