"""Ray Train fault tolerance: a training worker killed mid-run is restarted and resumes.

Regression test for "Ray Train never sees a checkpoint (rank 0 writes its own), so a lost
worker cannot resume a training run" (issue 12, item 8). The training state is reported to Ray
Train at every epoch; after a SIGKILL of the worker the run must continue from that state
(``resumes`` >= 1, the step count carried over) and end with every epoch's checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import proc_guard
import pytest


def _own_raylet_pid() -> int:
    """The raylet of this test session's Ray cluster (the parent of its worker processes)."""
    import ray

    node = ray._private.worker._global_node  # the node ray.init started in this process
    return int(node.all_processes["raylet"][0].process.pid)


def _train_workers(raylet: int) -> list[int]:
    """Ray Train worker processes that descend from our raylet (never anyone else's)."""
    found = []
    for pid in sorted(proc_guard.tree(raylet) - {raylet}):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "RayTrainWorker" in cmdline:
            found.append(pid)
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_killed_training_worker_resumes_from_the_last_reported_epoch(
    ray_cluster: None, tmp_path: Path
) -> None:
    from qmag_ray.synth import SynthSpec, write_dataset
    from qmag_ray.training.config import TrainConfig
    from qmag_ray.training.loop import checkpoint_name
    from qmag_ray.training.trainer import train

    data = str(tmp_path / "synth")
    write_dataset(data, SynthSpec(identities=8, images_per_identity=4, seed=5))
    out = tmp_path / "run"
    epochs, batch = 4, 8
    steps_per_epoch = 32 // batch
    raylet = _own_raylet_pid()
    killed: list[int] = []

    def kill_after_second_epoch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if (out / checkpoint_name(2)).exists():
                workers = _train_workers(raylet)
                if workers:
                    killed.append(workers[0])
                    os.kill(workers[0], signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_second_epoch, daemon=True)
    killer.start()
    result = train(
        TrainConfig(
            data=data,
            output=str(out),
            epochs=epochs,
            batch_size=batch,
            log_every=1,
            warmup_steps=1,
            lr=0.01,
            max_failures=2,
        )
    )
    killer.join(timeout=5)
    assert killed, "the test never saw a training worker to kill"
    assert proc_guard.start_time(killed[0]) is None  # it really died

    assert result.resumes >= 1  # restored from Ray Train's checkpoint, not started over
    assert result.epoch == epochs
    steps = [int(h["step"]) for h in result.history]
    # one entry per step, carried over the restart: no step repeated, none missing
    assert steps == list(range(1, epochs * steps_per_epoch + 1))
    assert max(int(h["resumes"]) for h in result.history) == result.resumes
    for epoch in range(1, epochs + 1):
        assert (out / checkpoint_name(epoch)).exists()
    recorded = json.loads((out / "history.json").read_text())
    assert recorded["resumes"] == result.resumes and recorded["epoch"] == epochs
