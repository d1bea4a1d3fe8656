"""README as a test: its shell blocks keep working, and a failure names the README line.

Every ```bash block in README.md carries an annotation on the line before it:

* ``<!-- readme-test: run -->``: the suite runs each command of the block, as written, in a
  working folder that holds what the README says a user has (``demo-out/images``: a small
  synthetic face set; ``pairs.csv``: a pair list of those faces; the repository's ``qmag_ray/``
  and ``jobs/``), on the session's Ray cluster, one small embeddings set shared by all blocks;
* ``<!-- readme-test: example (what it needs) -->``: the block needs real infrastructure (an
  official checkpoint on ``s3://bucket``, Kubernetes, Docker, a cloud account); its commands
  are still checked without running: every ``qmag-ray`` command must parse (options, choices,
  values) against the current CLI, every ``python jobs/...`` script and ``--config`` file must
  exist, every ``make`` target and every repository file a command names (``infra/...``,
  ``jobs/...``) must exist.

An unannotated block fails the suite, so a new README command is always one or the other.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer.main
from typer.testing import CliRunner

from qmag_ray.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ANNOTATION = re.compile(r"<!--\s*readme-test:\s*(run|example)\b(.*?)-->")
REPO_PATH = re.compile(r"^(infra|jobs|qmag_ray|tests)/[\w./-]*$")


@dataclass(frozen=True)
class Command:
    line: int  # 1-based README line of the command's first line
    text: str  # the command with continuation lines joined
    argv: list[str]  # shell words, environment assignments removed

    def where(self) -> str:
        return f"README.md:{self.line}: `{self.text}`"


@dataclass(frozen=True)
class Block:
    line: int  # README line of the opening fence
    kind: str | None  # run / example / None (unannotated)
    commands: list[Command]


def readme_blocks(text: str) -> list[Block]:
    """The ```bash blocks of ``text`` with their annotations and commands."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        found = ANNOTATION.search(lines[j]) if j >= 0 else None
        start, body, i = i, [], i + 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append((i + 1, lines[i]))
            i += 1
        blocks.append(Block(start + 1, found.group(1) if found else None, _commands(body)))
        i += 1
    return blocks


def _commands(body: list[tuple[int, str]]) -> list[Command]:
    out: list[Command] = []
    pending: list[str] = []
    first = 0
    for number, raw in body:
        if not pending:
            first = number
        pending.append(raw.rstrip().removesuffix("\\").strip())
        if raw.rstrip().endswith("\\"):
            continue
        text = " ".join(pending).strip()
        pending = []
        words = shlex.split(text, comments=True)
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            out.append(Command(first, text.split(" #", 1)[0].strip(), words))
    return out


BLOCKS = readme_blocks(README.read_text())


def _ids(blocks: list[Block]) -> list[str]:
    return [f"README.md:{b.line}" for b in blocks]


def test_every_shell_block_is_annotated() -> None:
    bare = [f"README.md:{b.line}" for b in BLOCKS if b.kind is None]
    assert not bare, (
        "shell block(s) without <!-- readme-test: run --> or <!-- readme-test: example (...) -->"
        f" on the line before: {', '.join(bare)}"
    )
    assert any(b.kind == "run" for b in BLOCKS)


def _check_qmag(cmd: Command, words: list[str]) -> None:
    """The command parses against the CLI as it is now (no command is run)."""
    group = typer.main.get_command(app)
    assert words and words[0] in group.commands, f"{cmd.where()}: no command {words[:1]}"
    group.commands[words[0]].make_context(words[0], list(words[1:]))


def _check_static(cmd: Command) -> None:
    words = cmd.argv
    if words[:3] == ["ray", "job", "submit"] and "--" in words:
        words = words[words.index("--") + 1 :]
    head = words[0]
    try:
        if head == "qmag-ray":
            _check_qmag(cmd, words[1:])
        elif head == "python" and len(words) > 1 and words[1].startswith("jobs/"):
            assert (REPO / words[1]).is_file(), f"{cmd.where()}: no script {words[1]}"
        elif head == "make":
            targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
            for target in (w for w in words[1:] if "=" not in w):
                assert target in targets, f"{cmd.where()}: no make target {target!r}"
    except AssertionError:
        raise
    except Exception as exc:  # the CLI's own usage errors (no such option, bad value...)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise AssertionError(f"{cmd.where()}: {message}") from None
    for word in words:
        value = word.split("=", 1)[-1]
        if REPO_PATH.match(value) and "*" not in value:
            assert (REPO / value).exists(), f"{cmd.where()}: {value} does not exist"


@pytest.mark.parametrize("block", BLOCKS, ids=_ids(BLOCKS))
def test_every_command_parses_and_names_existing_files(block: Block) -> None:
    for cmd in block.commands:
        _check_static(cmd)


# --- the blocks that run ---------------------------------------------------------------------
RUN_BLOCKS = [b for b in BLOCKS if b.kind == "run"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the README's run blocks expect a user to have, small: a synthetic face set in
    ``demo-out/images`` (as ``make demo`` leaves it), the repository's ``qmag_ray/`` and
    ``jobs/``, and (written once the faces are embedded) ``pairs.csv``."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("qmag_ray", "jobs"):
        (root / name).symlink_to(REPO / name)
    result = CliRunner().invoke(
        app,
        [
            "synth",
            "--output",
            str(root / "demo-out" / "images"),
            "--identities",
            "24",
            "--images-per-identity",
            "4",
            "--seed",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    return root


def _write_pairs(root: Path) -> None:
    """``pairs.csv``: every genuine pair and 60% of the impostor pairs of ``out/emb``, shuffled."""
    from qmag_ray.embeddings import load_embeddings

    table = load_embeddings(str(root / "out" / "emb"))
    rng = np.random.default_rng(0)
    rows = []
    n = len(table)
    for i in range(n):
        for j in range(i + 1, n):
            same = table.identity[i] == table.identity[j]
            if same or rng.random() < 0.6:
                rows.append((table.path[i], table.path[j], int(same)))
    frame = pd.DataFrame(rows, columns=["a", "b", "label"]).sample(frac=1, random_state=0)
    frame.to_csv(root / "pairs.csv", index=False)


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_run_blocks_work_as_written(
    ray_cluster: None, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow_fixtures import tracking_at

    monkeypatch.chdir(workdir)
    with tracking_at(f"sqlite:///{workdir / 'mlflow.db'}"):
        for block in RUN_BLOCKS:
            for cmd in block.commands:
                assert cmd.argv[0] == "qmag-ray", f"{cmd.where()}: run blocks hold qmag-ray only"
                if "pairs.csv" in cmd.argv and not (workdir / "pairs.csv").exists():
                    _write_pairs(workdir)
                result = CliRunner().invoke(app, cmd.argv[1:])
                tail = "\n".join(result.output.strip().splitlines()[-8:])
                assert result.exit_code == 0, f"{cmd.where()} exited {result.exit_code}:\n{tail}"
        # The defaults on this small set: the grid floor is raised, and MLflow says so.
        from mlflow import MlflowClient

        client = MlflowClient()
        runs = client.search_runs(
            [client.get_experiment_by_name("qmag-ray").experiment_id],
            "tags.`qmag_ray.kind` = 'calibrate'",
            order_by=["attributes.start_time ASC"],
        )
        assert runs[0].data.tags["qmag_ray.grid_note"].startswith("grid FMR floor raised from")


def test_the_checks_point_at_the_readme_line_of_a_broken_command() -> None:
    text = "\n".join(
        [
            "<!-- readme-test: example (nothing) -->",
            "```bash",
            "qmag-ray calibrate --embeddings E \\",
            "    --fmr-minimum 1e-3 --output O",
            "python jobs/no_such_job.py --config jobs/configs/calibrate.yaml",
            "kubectl apply -f infra/kuberay/no-such.yaml",
            "qmag-ray evaluate --embeddings E --pairs p --protocol nonsense --output O",
            "```",
            "```bash",
            "make test",
            "```",
        ]
    )
    blocks = readme_blocks(text)
    assert [b.kind for b in blocks] == ["example", None]
    expected = [
        "README.md:3: `qmag-ray calibrate --embeddings E --fmr-minimum 1e-3 --output O`: "
        "No such option: --fmr-minimum",
        "README.md:5: `python jobs/no_such_job.py --config jobs/configs/calibrate.yaml`: "
        "no script jobs/no_such_job.py",
        "README.md:6: `kubectl apply -f infra/kuberay/no-such.yaml`: "
        "infra/kuberay/no-such.yaml does not exist",
        "README.md:7: `qmag-ray evaluate --embeddings E --pairs p --protocol nonsense --output O`",
    ]
    for cmd, want in zip(blocks[0].commands, expected, strict=True):
        with pytest.raises(AssertionError) as err:
            _check_static(cmd)
        assert str(err.value).startswith(want), str(err.value)
    _check_static(blocks[1].commands[0])  # make test: a target that exists
