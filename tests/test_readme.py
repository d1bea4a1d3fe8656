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

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import proc_guard
import pytest
import typer.main
from mlflow_fixtures import free_port, tracking_at
from typer.testing import CliRunner

from qmag_ray.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from e2e_support import RayHead, alive_nodes, base_env, launch_ray_head  # noqa: E402

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
OUTPUT_ANNOTATION = re.compile(r"^\s*<!--\s*readme-test:\s*output\s*\((.+?)\)\s*-->\s*$")
NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?)")


@dataclass(frozen=True)
class Output:
    line: int  # README line of the opening fence
    command: list[str]  # the leading words of the command whose output this is
    lines: list[str]


def readme_outputs(text: str) -> list[Output]:
    """The measured-output blocks: a plain ``` fence after ``<!-- readme-test: output (WORDS)
    -->``, WORDS being the first words of the run command (the latest one before it)."""
    lines = text.splitlines()
    found: list[Output] = []
    for k, raw in enumerate(lines):
        match = OUTPUT_ANNOTATION.search(raw)
        if not match:
            continue
        i = k + 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        assert lines[i].strip() == "```", (
            f"README.md:{k + 1}: an output annotation needs a ``` block"
        )
        body = []
        j = i + 1
        while lines[j].strip() != "```":
            body.append(lines[j])
            j += 1
        found.append(Output(i + 1, match.group(1).split(), body))
    return found


def output_pattern(line: str) -> re.Pattern[str]:
    """A README output line as a pattern: numbers stand for any number, ``...`` for anything,
    a run of spaces for any run (table columns widen with their numbers)."""

    def literal(text: str) -> str:
        return r"\s+".join(re.escape(word) for word in re.split(r"\s+", text))

    parts = []
    for piece in re.split(r"(\.\.\.)", line.strip()):
        if piece == "...":
            parts.append(".*")
            continue
        last = 0
        for number in NUMBER.finditer(piece):
            parts.append(literal(piece[last : number.start()]))
            parts.append(NUMBER.pattern)
            last = number.end()
        parts.append(literal(piece[last:]))
    return re.compile("^" + "".join(parts) + "$")


def unmatched_output(expected: list[str], actual: list[str]) -> str | None:
    """The first README output line that does not match, in order, a line of ``actual``."""
    position = 0
    for line in (ln for ln in expected if ln.strip() and ln.strip() != "..."):
        pattern = output_pattern(line)
        while position < len(actual) and not pattern.match(actual[position].strip()):
            position += 1
        if position == len(actual):
            return line
        position += 1
    return None


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
    own = {flag for param in group.params for flag in param.opts}  # --version, --verbose...
    while words and words[0] in own:
        words = words[1:]
    if not words and cmd.argv[1:]:  # `qmag-ray --version`: the group's options alone
        return
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
IDENTITIES, IMAGES_PER_IDENTITY = 32, 5  # 160 faces: 1,600 impostor pairs per half
COMMAND_TIMEOUT = 600.0
HEAD_ATTEMPTS = 5  # a loaded machine misses Ray's fixed 30 s node window
#: The fixed ports of README's commands; the suite substitutes free ones (a shared machine).
HEAD_URL = "http://127.0.0.1:8265"
SERVE_PORT = re.compile(r"\b5001\b")
#: Ray's C++ core worker's own lines (``[date time,ms E pid tid] core_worker.cc:N: ...``).
PROGRESS_LINE = re.compile(r"^\d\d:\d\d:\d\d embedded \d+, failed \d+, \d+/\d+ done")
CORE_WORKER_LINE = re.compile(r"\] core_worker\.cc:\d+:")
#: What a command says once (a log line and a report line saying it again is noise): that it
#: attached to Ray, the version it registered, an alias it moved.
SAID_ONCE = {
    "connected": re.compile(r"\bconnected to (Ray\b|\d)"),
    "registered": re.compile(r"\bqmagface version \d+$"),
    "alias": re.compile(r"\bqmagface@\w+ -> version \d+$"),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the README's run blocks expect a user to have, small: a synthetic face set in
    ``demo-out/images`` (as ``make demo`` leaves it), the repository's ``qmag_ray/`` and
    ``jobs/`` (a copy: ``ray job submit --working-dir .`` uploads it), and (written once the
    faces are embedded) ``pairs.csv``."""
    root = tmp_path_factory.mktemp("readme")
    (root / "qmag_ray").symlink_to(REPO / "qmag_ray")
    shutil.copytree(REPO / "jobs", root / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    result = CliRunner().invoke(
        app,
        [
            "synth",
            "--output",
            str(root / "demo-out" / "images"),
            "--identities",
            str(IDENTITIES),
            "--images-per-identity",
            str(IMAGES_PER_IDENTITY),
            "--seed",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def readme_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """The Ray cluster of README's commands: ``ray start --head`` (tests/e2e/e2e_support.py:
    its own temp dir and free ports, token authentication on), stopped by its process ids."""
    root = tmp_path_factory.mktemp("readme-ray")
    problems = []
    for attempt in range(1, HEAD_ATTEMPTS + 1):
        head = launch_ray_head(root / f"ray-start-{attempt}.log")
        try:
            problem = _head_problem(head)
            if problem is None:
                yield head
                return
            problems.append(f"attempt {attempt}: {problem}")
        finally:
            head.stop()
    pytest.fail("`ray start --head` did not come up:\n" + "\n".join(problems))


def _head_problem(head: RayHead) -> str | None:
    """None once the head's node is alive; else why not. On a loaded machine `ray start`
    can miss Ray's fixed 30 s node start-up window and exit after its job API answered."""
    try:
        head.service.wait_ready()
    except RuntimeError as exc:
        return str(exc)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.service.proc.poll() is not None:
            return (
                f"ray start exited with {head.service.proc.returncode}:\n{head.service.log_tail()}"
            )
        try:
            if alive_nodes(head):
                return None
        except subprocess.TimeoutExpired:  # `ray list nodes` itself is slow on a loaded machine
            pass
        time.sleep(2)
    return f"no node alive after 120 s:\n{head.service.log_tail()}"


def _write_pairs(root: Path) -> None:
    """``pairs.csv``: every pair of ``out/emb`` (a, b, label), shuffled."""
    from qmag_ray.embeddings import load_embeddings

    table = load_embeddings(str(root / "out" / "emb"))
    rows = [
        (table.path[i], table.path[j], int(table.identity[i] == table.identity[j]))
        for i in range(len(table))
        for j in range(i + 1, len(table))
    ]
    frame = pd.DataFrame(rows, columns=["a", "b", "label"]).sample(frac=1, random_state=0)
    frame.to_csv(root / "pairs.csv", index=False)


@dataclass
class Ran:
    cmd: Command
    output: str  # stdout and stderr as a terminal shows them (one pipe)


class ReadmeShell:
    """Runs README commands as a user types them, in ``root``, with bash.

    What differs from a user's terminal, and why: the commands attach to the module's Ray head
    (``RAY_ADDRESS`` and its token in the environment; README's `ray start --head` is that
    head, its `ray stop` is the fixture stopping it by process id: other people's Ray runs on
    this machine), and README's fixed ports (8265, 5001) become free ones. A command ending in
    ``&`` runs in the background (registered with tests/proc_guard.py); `kill %N` stops it.
    """

    def __init__(self, root: Path, head: RayHead, serve_port: int) -> None:
        self.root, self.head, self.serve_port = root, head, serve_port
        self.env = base_env(
            RAY_ADDRESS=head.gcs_address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token
        )
        self.background: list[subprocess.Popen] = []
        self.ran: list[Ran] = []

    def text(self, cmd: Command) -> str:
        text = cmd.text.replace(HEAD_URL, self.head.address)
        return SERVE_PORT.sub(str(self.serve_port), text)

    def run(self, cmd: Command) -> None:
        words = cmd.argv
        if words[:3] == ["ray", "start", "--head"] or words[:2] == ["ray", "stop"]:
            return  # the module's head (see the class docstring)
        if words[0] == "export":
            for assignment in words[1:]:
                key, _, value = assignment.partition("=")
                self.env[key] = value
            return
        if words[0] == "kill" and len(words) == 2 and words[1].startswith("%"):
            proc_guard.stop(self.background[int(words[1][1:]) - 1])
            return
        text = self.text(cmd)
        if text.endswith("&"):
            log = self.root / f"background-{len(self.background) + 1}.log"
            proc = proc_guard.spawn(
                ["bash", "-c", text.removesuffix("&").strip()],
                name=f"README.md:{cmd.line}",
                log=log,
                env=self.env,
                cwd=self.root,
            )
            self.background.append(proc)
            return
        result = subprocess.run(
            ["bash", "-c", text],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        # what each command printed, for README's measured-output blocks (QMAG_README_OUTPUTS
        # keeps a copy outside pytest's temp dirs, which later runs remove)
        for folder in (self.root / "outputs", os.environ.get("QMAG_README_OUTPUTS")):
            if folder:
                Path(folder).mkdir(parents=True, exist_ok=True)
                record = Path(folder) / f"README-{cmd.line}.txt"
                record.write_text(f"$ {cmd.text}\n{result.stdout}")
        tail = "\n".join(result.stdout.strip().splitlines()[-12:])
        assert result.returncode == 0, f"{cmd.where()} exited {result.returncode}:\n{tail}"
        self.ran.append(Ran(cmd, result.stdout))

    def stop(self) -> None:
        for proc in self.background:
            proc_guard.stop(proc)

    def output_of(self, *words: str) -> Ran:
        """The first command that ran whose words start with ``words``."""
        found = [r for r in self.ran if r.cmd.argv[: len(words)] == list(words)]
        assert found, f"README runs no `{' '.join(words)}` block"
        return found[0]

    def output_before(self, line: int, *words: str) -> Ran:
        """The last command before README line ``line`` whose words start with ``words``
        (a measured-output block is the output of the command it follows)."""
        found = [
            r for r in self.ran if r.cmd.line < line and r.cmd.argv[: len(words)] == list(words)
        ]
        assert found, f"README.md:{line}: no `{' '.join(words)}` command runs before this block"
        return found[-1]


@pytest.mark.e2e
@pytest.mark.mlflow
@pytest.mark.slow
def test_run_blocks_work_as_written(workdir: Path, readme_head: RayHead) -> None:
    shell = ReadmeShell(workdir, readme_head, free_port())
    try:
        for block in RUN_BLOCKS:
            for cmd in block.commands:
                if "pairs.csv" in cmd.argv and not (workdir / "pairs.csv").exists():
                    _write_pairs(workdir)
                shell.run(cmd)
    finally:
        shell.stop()

    # README's measured output of each command: its lines, in order, numbers aside
    for output in readme_outputs(README.read_text()):
        ran = shell.output_before(output.line, *output.command)
        actual = ran.output.splitlines()
        missing = unmatched_output(output.lines, actual)
        assert missing is None, (
            f"README.md:{output.line}: `{missing}` is not in what {ran.cmd.where()} printed:\n"
            + "\n".join(actual[-40:])
        )

    # every command says each of these once (not once per layer)
    for ran in shell.ran:
        for what, pattern in SAID_ONCE.items():
            said = [ln for ln in ran.output.splitlines() if pattern.search(ln.strip())]
            assert len(said) <= 1, f"{ran.cmd.where()} says {what} twice:\n" + "\n".join(said)

    # embed: a short default output, none of Ray's core_worker lines (README "Output")
    embed = shell.output_of("qmag-ray", "embed")
    lines = embed.output.splitlines()
    assert not [ln for ln in lines if CORE_WORKER_LINE.search(ln)], embed.output
    # progress lines come every 10 s (their number depends on the machine's load): not counted
    steady = [ln for ln in lines if not PROGRESS_LINE.match(ln)]
    assert len(steady) <= 8, embed.output
    n = IDENTITIES * IMAGES_PER_IDENTITY
    assert f"{n}/{n} embedded" in embed.output

    # The defaults on this small set: the grid floor is raised, and MLflow says so; the first
    # calibration whose guard passes became champion (the consumers' alias).
    from mlflow import MlflowClient

    with tracking_at(f"sqlite:///{workdir / 'mlflow.db'}"):
        client = MlflowClient()
        runs = client.search_runs(
            [client.get_experiment_by_name("qmag-ray").experiment_id],
            "tags.`qmag_ray.kind` = 'calibrate'",
            order_by=["attributes.start_time ASC"],
        )
        assert runs[0].data.tags["qmag_ray.grid_note"].startswith("grid FMR floor raised from")
        assert client.get_model_version("qmagface", "1").run_id == runs[0].info.run_id
        # README's recalibration runs later and may move the alias on; it is judged against
        # the champion it found, which must be that first version
        champion = client.get_model_version_by_alias("qmagface", "champion")
        assert champion.tags.get("gate.champion_version", champion.version) == "1", champion.tags

    # REST: the served champion scored the request (its own cosine passed through)
    curl = shell.output_of("curl")
    predictions = json.loads(curl.output)["predictions"]
    assert len(predictions) == 1 and predictions[0]["cosine"] == pytest.approx(0.42)
    assert {"score", "quality", "match"} <= set(predictions[0])

    # ray job submit: the job embedded every face into the folder it was told
    job = shell.output_of("ray", "job", "submit")
    summary = json.loads((workdir / "out" / "job-emb" / "summary.json").read_text())
    assert summary["counts"]["embedded"] == IDENTITIES * IMAGES_PER_IDENTITY, job.output[-3000:]


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
    version, unknown = readme_blocks(
        "```bash\nqmag-ray --version\n```\n```bash\nqmag-ray --versions\n```"
    )
    _check_static(version.commands[0])  # the group's own option alone
    with pytest.raises(AssertionError, match=r"README.md:5: .* no command \['--versions'\]"):
        _check_static(unknown.commands[0])


def test_measured_output_blocks_match_lines_in_order_with_numbers_free() -> None:
    text = "\n".join(
        [
            "<!-- readme-test: output (qmag-ray embed) -->",
            "```",
            "22:45:03 embedding 96 images with iresnet-demo (128-d) on 1 actor(s)",
            "...",
            "succeeded: 96/96 embedded, 0 failed, 4.7 images/s -> .../out/emb",
            "```",
        ]
    )
    [output] = readme_outputs(text)
    assert output.command == ["qmag-ray", "embed"] and output.line == 2
    printed = [
        "10:00:01 connected to Ray at 127.0.0.1:6379",
        "10:00:02 embedding 160 images with iresnet-demo (128-d) on 1 actor(s)",
        "10:00:09 embedded 80, failed 0",
        "succeeded: 160/160 embedded, 0 failed, 12.25 images/s -> /home/u/q/out/emb",
    ]
    assert unmatched_output(output.lines, printed) is None
    table = ["FNMR % @ FMR 1e-02 [16 false matches]             8.750            4.375"]
    assert unmatched_output(table, ["FNMR % @ FMR 1e-03 [9* false matches] 18.75  4.1"])
    assert unmatched_output(table, ["FNMR % @ FMR 1e-03 [19 false matches] 18.750 14.375"]) is None
    # a word changed, a line missing, or the lines in another order: named
    assert unmatched_output(output.lines, [printed[1].replace("actor", "task"), printed[3]])
    assert unmatched_output(output.lines, printed[1:2]) == output.lines[2]
    assert unmatched_output(output.lines, [printed[3], printed[1]]) == output.lines[2]
