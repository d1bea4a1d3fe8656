"""Concurrent promotions against a real ``mlflow server`` (test support, also run by hand).

Each trial is a registered model with three versions whose held-out FNMR is in their tags:
v1 = 0.10 (the champion), v2 = 0.08 and v3 = 0.05, judged by a zero-tolerance gate. Two
processes promote v2 and v3 of every trial at once (one thread per trial, a start file releases
them together, a seeded jitter of up to ``--jitter-ms`` varies who goes first). Whatever the
order, the only correct end is ``champion = v3``: v3 passes against v1 and v2; v2 passes against
v1 but not against v3. The old read-then-write promotion (``--mode unlocked``) can end on v2.

By hand (a server of its own behind the latency proxy; prints the counts):
    .venv/bin/python tests/faults/promotion_race.py --trials 50 --latency-ms 150 --mode unlocked
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FNMR = {"1": 0.10, "2": 0.08, "3": 0.05}
KEY = "qmagface.fnmr_at_fmr_1e-03"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def setup_trials(tracking_uri: str, prefix: str, n: int) -> list[str]:
    """``n`` registered models, v1..v3 each with its FNMR tag, champion -> v1."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    names = [f"{prefix}-{i:03d}" for i in range(n)]
    run_id = client.create_run(client.create_experiment(f"{prefix}-setup")).info.run_id

    def one(name: str) -> None:
        client.create_registered_model(name)
        for version, fnmr in FNMR.items():
            made = client.create_model_version(
                name, source=f"runs:/{run_id}/scorer", run_id=run_id, tags={KEY: repr(fnmr)}
            )
            assert str(made.version) == version
        client.set_registered_model_alias(name, "champion", "1")

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one, names))
    return names


def _old_promote(name: str, version: str, metrics: dict, evaluate, gate) -> dict:
    """The promotion as it was before the lock: read the alias, decide, re-read, write."""
    from qmag_ray.tracking.gate import decide
    from qmag_ray.tracking.promotion import _tags
    from qmag_ray.tracking.registry import CHAMPION, alias_version, move_alias, tag_version

    for _ in range(5):
        current = alias_version(name, CHAMPION)
        current_version = None if current is None else str(current.version)
        champion = None if current is None else evaluate(current)
        decision = decide(metrics, champion, gate)
        tag_version(name, version, _tags(decision, metrics, champion, current_version, gate))
        if not decision.promote:
            return {"promoted": False, "before": current_version, "reasons": decision.reasons}
        if move_alias(name, CHAMPION, version, expected=current_version):
            return {"promoted": True, "before": current_version, "reasons": decision.reasons}
    return {"promoted": False, "before": None, "reasons": ["gave up"]}


def worker(args: argparse.Namespace) -> None:
    """One side of every trial: promote ``args.version`` of each model, one thread each."""
    import mlflow
    from mlflow import MlflowClient

    from qmag_ray.tracking.gate import GateConfig
    from qmag_ray.tracking.promotion import promote_if_better

    mlflow.set_tracking_uri(args.tracking)
    mlflow.set_registry_uri(args.tracking)
    names = json.loads(Path(args.models).read_text())
    gate = GateConfig(target_fmr=1e-3)
    rng = random.Random(args.seed)
    jitter = {name: rng.uniform(0, args.jitter_ms / 1000) for name in names}
    metrics = {KEY: FNMR[args.version]}
    lock = threading.Lock()

    def evaluate(champion) -> dict[str, float]:  # the champion's figures, from the server
        tags = MlflowClient().get_model_version(champion.name, champion.version).tags
        return {KEY: float(tags[KEY])}

    def one(name: str) -> None:
        time.sleep(jitter[name])
        try:
            if args.mode == "locked":
                p = promote_if_better(name, args.version, metrics, evaluate, gate)
                out = {
                    "promoted": p.promoted,
                    "before": p.previous_champion,
                    "reasons": p.decision.reasons,
                }
            else:
                out = _old_promote(name, args.version, metrics, evaluate, gate)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out = {"error": f"{type(exc).__name__}: {exc}"}
        with lock:
            print(json.dumps({"model": name, "version": args.version, **out}), flush=True)

    Path(f"{args.go}.ready-{args.version}").touch()  # imported: ready to race
    while not os.path.exists(args.go):
        time.sleep(0.005)
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        list(pool.map(one, names))


def race(
    tracking_uri: str,
    names: list[str],
    workdir: Path,
    mode: str,
    jitter_ms: float,
    seed: int = 0,
    concurrency: int = 10,
) -> list[dict]:
    """Start the two sides (v2, v3) as processes, release them together, collect outcomes."""
    models = workdir / f"models-{seed}.json"
    models.write_text(json.dumps(names))
    go = workdir / f"go-{seed}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("MLFLOW_REGISTRY_URI", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__)),
                "--worker",
                "--tracking",
                tracking_uri,
                "--models",
                str(models),
                "--version",
                version,
                "--go",
                str(go),
                "--mode",
                mode,
                "--jitter-ms",
                str(jitter_ms),
                "--seed",
                str(seed * 10 + int(version)),
                "--concurrency",
                str(concurrency),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for version in ("2", "3")
    ]
    deadline = time.monotonic() + 600
    while not all(Path(f"{go}.ready-{v}").exists() for v in ("2", "3")):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            break  # reported below with the worker's stderr
        time.sleep(0.05)
    go.touch()  # both sides have imported everything: release them together
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed ({proc.returncode}):\n{err[-4000:]}")
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


def champions(tracking_uri: str, names: list[str]) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return {n: str(client.get_model_version_by_alias(n, "champion").version) for n in names}


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--tracking")
    parser.add_argument("--models")
    parser.add_argument("--version")
    parser.add_argument("--go")
    parser.add_argument("--mode", choices=["locked", "unlocked"], default="locked")
    parser.add_argument("--jitter-ms", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=10, help="trials racing at once")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=150.0)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from latency_proxy import LatencyProxy
    from mlflow_fixtures import free_port, mlflow_server_args, running, subprocess_env

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        env = subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with running(
            mlflow_server_args(root, port),
            root / "server.log",
            f"http://127.0.0.1:{port}/health",
            env,
        ):
            direct = f"http://127.0.0.1:{port}"
            names = setup_trials(direct, "race", args.trials)
            with LatencyProxy(port, args.latency_ms / 1000) as proxy:
                results = race(
                    proxy.url, names, root, args.mode, args.jitter_ms, args.seed, args.concurrency
                )
            ends = champions(direct, names)
    worse = sorted(n for n, v in ends.items() if v != "3")
    errors = [r for r in results if "error" in r]
    for r in errors[:5]:
        print("ERROR", r, file=sys.stderr)
    for n in worse[:5]:
        print("WORSE", n, ends[n], [r for r in results if r["model"] == n], file=sys.stderr)
    print(
        json.dumps(
            {
                "mode": args.mode,
                "trials": len(names),
                "latency_ms": args.latency_ms,
                "champion_v3": len(names) - len(worse),
                "champion_worse": len(worse),
                "errors": len(errors),
            }
        )
    )


if __name__ == "__main__":
    _main()
