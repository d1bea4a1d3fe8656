"""The settings models and the command line generated from them (issue 10 item 1, issue 11
item 6): every setting has an option with help, help texts state the model's defaults, a bad
configuration names its YAML key and flag and fails before Ray starts or anything is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from qmag_ray.cli import app
from qmag_ray.cli.settings_command import COMMAND_MODELS, declared_default
from qmag_ray.config import (
    ConfigError,
    format_default,
    is_settings,
    load_config,
    option_specs,
    sections_of,
)

SETTINGS_COMMANDS = {"calibrate", "evaluate", "embed", "identify", "recalibrate", "train"}


def click_command(name: str):  # typer's own (vendored) click command
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def options_of(name: str) -> dict:
    out = {}
    for param in click_command(name).params:
        if param.param_type_name == "option":
            for opt in param.opts:
                out[opt] = param
    return out


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_every_settings_command_is_generated_from_its_model() -> None:
    assert set(COMMAND_MODELS) >= SETTINGS_COMMANDS


@pytest.mark.parametrize("command", sorted(SETTINGS_COMMANDS))
def test_every_setting_has_an_option_with_help_stating_the_models_default(command: str) -> None:
    model = COMMAND_MODELS[command]
    options = options_of(command)
    specs = option_specs(model)
    assert specs, model
    for spec in specs:
        assert spec.flag in options, f"{command}: {spec.key} has no option {spec.flag}"
        param = options[spec.flag]
        assert param.help, f"{command} {spec.flag} has no help text"
        stated = declared_default(param.help)
        if spec.required:
            assert stated is None and "required" in param.help, (command, spec.flag)
        elif spec.is_bool:
            expected = f"--{'' if spec.default else 'no-'}{spec.flag[2:]}"
            assert stated == expected, (command, spec.flag, stated, spec.default)
        elif stated is not None and spec.default not in (None, ""):
            assert stated == format_default(spec.default), (command, spec.flag, stated)
        elif stated is not None:  # None means "derived": the help says how, in words
            assert spec.default in (None, "", ()), (command, spec.flag, stated)
        else:  # no statement only where the model's default is "unset"
            assert spec.default in (None, "", {}, ()), (command, spec.flag, spec.default)


def test_every_option_of_every_command_has_help() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert SETTINGS_COMMANDS | {"synth", "demo"} <= set(commands)
    for name, command in commands.items():
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{name} --{param.name} has no help text"


def test_no_setting_is_declared_twice_across_stage_models() -> None:
    """Every field of every command's settings is declared by exactly one class; commands
    get it through inheritance (flat keys) or sections (nested keys)."""
    for model in COMMAND_MODELS.values():
        for cls in sections_of(model).values():
            for field in dataclasses.fields(cls):
                owners = [
                    k.__qualname__
                    for k in cls.__mro__
                    if is_settings(k) and field.name in k.__dict__.get("__annotations__", {})
                ]
                assert len(owners) == 1, f"{cls.__name__}.{field.name} declared in {owners}"


def test_flags_are_unique_within_each_command() -> None:
    for command, model in COMMAND_MODELS.items():
        flags = [s.flag for s in option_specs(model)]
        assert len(flags) == len(set(flags)), command


def test_arch_help_lists_every_registered_backbone() -> None:
    import subprocess
    import sys

    # the backbones the package itself registers (a fresh interpreter: tests register their
    # own small ones, e.g. test-deep-demo, which the CLI rightly does not list)
    names = subprocess.run(
        [sys.executable, "-c", "import qmag_ray.model as m; print(*m.backbone_names())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    help_text = options_of("embed")["--arch"].help
    assert names, "no backbone registered"
    for name in names:
        assert name in help_text, name
    assert "iresnet-demo" in help_text


def test_method_is_a_choice() -> None:
    code, text = invoke(["calibrate", "--embeddings", "e", "--output", "o", "--method", "sig"])
    assert code == 2 and "Invalid value for '--method'" in text
    help_text = options_of("calibrate")["--method"].help
    assert all(m in help_text for m in ("paper", "raw", "direct"))


def test_synth_image_format_is_a_choice(tmp_path: Path) -> None:
    code, text = invoke(["synth", "--output", str(tmp_path / "s"), "--image-format", "gif"])
    assert code == 2 and "Invalid value for '--image-format'" in text
    assert not (tmp_path / "s").exists()  # refused before anything is written
    assert "'gif' is not one of 'jpg', 'png'" in " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize(
    ("argv", "flag", "bad", "allowed"),
    [
        (["embed", "--images", "i", "--output", "o"], "--quality", "sharpness", ["norm", "serfiq"]),
        (
            ["embed", "--images", "i", "--output", "o"],
            "--serfiq-dropout-type",
            "spatial",
            ["element", "channel"],
        ),
        (
            ["embed", "--images", "i", "--output", "o"],
            "--input-convention",
            "bgr",
            ["insightface", "magface"],
        ),
        (
            ["train", "--data", "d", "--output", "o"],
            "--dropout-type",
            "spatial",
            ["element", "channel"],
        ),
    ],
)
def test_string_settings_with_a_fixed_set_of_values_are_choices(
    tmp_path: Path, argv: list[str], flag: str, bad: str, allowed: list[str]
) -> None:
    argv = [a if a in argv[:1] or a.startswith("-") else str(tmp_path / a) for a in argv]
    code, text = invoke([*argv, flag, bad])
    flat = " ".join(text.replace("│", " ").split())
    assert code == 2 and f"Invalid value for '{flag}'" in flat
    assert f"{bad!r} is not one of " + ", ".join(repr(a) for a in allowed) in flat
    assert not any(tmp_path.iterdir())  # refused by the parser, before anything is written


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    code, text = invoke(["--version"])
    assert code == 0 and text.strip() == f"qmag-ray {version('qmag-ray')}"


def test_recalibration_yaml_errors_name_key_and_flag_before_anything_runs(
    tmp_path: Path,
) -> None:
    import ray

    path = tmp_path / "recal.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "images": str(tmp_path / "no-images"),
                "embeddings": str(tmp_path / "emb"),
                "model": str(tmp_path / "no-model.pth"),
                "arch": "iresnet-demo",
                "output": str(tmp_path / "runs"),
                "holdout": {"embeddings": "h", "pairs": "p.csv", "on_self": "skip"},
                "method": "sigmoid",
                "embed": {"actors": -3, "batch_size": 0},
                "tracking": {"tracking_uri": "http://127.0.0.1:9"},
            }
        )
    )
    was_connected = ray.is_initialized()
    code, text = invoke(["recalibrate", "--config", str(path)])
    assert code == 2, text
    assert "method (--method) must be one of paper, raw or direct, got 'sigmoid'" in text
    assert "embed.actors (--actors) must be >= 1, got -3" in text
    assert "embed.batch_size (--batch-size) must be >= 1, got 0" in text
    assert str(path) in text and "Traceback" not in text
    # nothing read or started: the missing model and images are not reported, no Ray, no MLflow
    assert "not found" not in text and "tracking" not in text.split("error:")[0]
    assert ray.is_initialized() == was_connected
    assert not (tmp_path / "runs").exists()


def test_recalibrate_takes_every_calibrate_and_evaluate_setting() -> None:
    """Each calibrate setting except the calibration pair list, and each evaluate pair and
    evaluation setting (as holdout.*), is a recalibration setting with the same meaning."""
    recal = {s.key: s for s in option_specs(COMMAND_MODELS["recalibrate"])}
    listed_only = {"pairs", "protocol", "prefix", "match", "on_missing", "on_self", "on_duplicate"}
    listed_only |= {"templates", "pooling"}
    for spec in option_specs(COMMAND_MODELS["calibrate"]):
        # the calibration's input is the recalibration's own (finished) embed output
        if spec.key in listed_only or spec.key in ("embeddings", "allow_incomplete", "output"):
            continue
        if spec.key.startswith("tracking."):
            continue
        assert spec.key in recal, spec.key
        assert recal[spec.key].default == spec.default and recal[spec.key].help == spec.help
    for spec in option_specs(COMMAND_MODELS["evaluate"]):
        # a recalibration's scorer is its own fit, and its held-out embeddings must come from
        # its model (check_holdout_model): the scorer and another-model settings do not apply
        scorer = ("calibration", "alpha", "beta", "allow_other_model")
        if spec.key in ("output", *scorer) or spec.key.startswith("tracking."):
            continue
        assert f"holdout.{spec.key}" in recal, spec.key
    assert {"direct.coarse", "holdout.on_bad", "holdout.on_self", "holdout.on_duplicate"} <= set(
        recal
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"grid.fmr_min": -1}, r"grid\.fmr_min \(--fmr-min\) must be > 0.0, got -1"),
        ({"validation.fraction": 1.5}, r"validation\.fraction \(--validation-fraction\)"),
        ({"register_as": "x"}, r"unknown setting register_as .*did you mean tracking\.register_as"),
        ({"grid.n_fmrr": 3}, r"unknown setting grid\.n_fmrr .*did you mean grid\.n_fmr\?"),
        (
            {"pair_mode": "listed"},
            r"pair_mode \(--pair-mode\) listed needs pairs \(--pairs\)",
        ),
    ],
)
def test_config_errors_name_the_key_and_the_flag(overrides: dict, message: str) -> None:
    from qmag_ray.workflows.config import CalibrateConfig

    with pytest.raises(ConfigError, match=message):
        load_config(CalibrateConfig, None, {"embeddings": "e", "output": "o", **overrides})


def test_yaml_and_options_map_onto_the_same_names(tmp_path: Path) -> None:
    """A YAML section and the option of the same setting give the same configuration."""
    from qmag_ray.workflows.config import CalibrateConfig

    path = tmp_path / "c.yaml"
    path.write_text("embeddings: e\noutput: o\ngrid: {n_fmr: 7}\ndirect: {rounds: 2}\n")
    from_yaml = load_config(CalibrateConfig, str(path))
    from_flags = load_config(
        CalibrateConfig,
        None,
        {"embeddings": "e", "output": "o", "grid.n_fmr": 7, "direct.rounds": 2},
    )
    assert from_yaml == from_flags
    assert from_yaml.grid.n_fmr == 7 and from_yaml.direct.rounds == 2


def test_train_takes_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("data: d\noutput: o\noptimizer: adam\nmagface: {l_a: 200}\n")
    code, text = invoke(["train", "--config", str(path)])
    assert code == 2, text
    assert "optimizer (--optimizer) must be one of sgd or adamw, got 'adam'" in text
    from qmag_ray.training.config import TrainConfig

    path.write_text("data: d\noutput: o\nepochs: 3\nmagface: {scale: 32}\n")
    cfg = load_config(TrainConfig, str(path), {"epochs": 4})
    assert (cfg.epochs, cfg.magface.scale, cfg.data) == (4, 32.0, "d")


def test_set_overrides_any_setting_by_its_yaml_key_and_a_flag_wins(tmp_path: Path) -> None:
    path = tmp_path / "recal.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "images": str(tmp_path / "no-images"),
                "embeddings": str(tmp_path / "emb"),
                "model": str(tmp_path / "no-model.pth"),
                "arch": "iresnet-demo",
                "output": str(tmp_path / "runs"),
                "holdout": {"embeddings": "h", "pairs": "p.csv"},
                "method": "sigmoid",
            }
        )
    )
    args = ["recalibrate", "--config", str(path), "--set", "method=raw"]
    args += ["--set", "embed.actors=-3", "--set", "embed.batch_size=0", "--batch-size", "-7"]
    code, text = invoke(args)
    assert code == 2, text
    assert "sigmoid" not in text  # --set method=raw replaced the file's method
    assert "embed.actors (--actors) must be >= 1, got -3 (from the command line)" in text
    assert "embed.batch_size (--batch-size) must be >= 1, got -7 (from the command line)" in text
    code, text = invoke(["recalibrate", "--config", str(path), "--set", "embed.actors"])
    assert code == 2 and "--set 'embed.actors' is not of the form key=value" in text, text
