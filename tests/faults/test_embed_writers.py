"""One writer per embedding output (issue 12, item 2): the output lease of ``run_embed``.

Two runs on one output while the first is embedding: the second is refused at once, before any
Ray work, with a message naming the holder (purpose, host, pid), and the output ends with
exactly one row per image. A lease left by a writer that died (its pid is gone) is taken over
by the next run, which completes the output. (Two concurrent ``ray job submit`` of the embed
job on a real multi-node cluster: tests/e2e/test_multinode_embed.py.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from qmag_ray import lease
from qmag_ray.embedding import EmbedConfig, EmbedError, run_embed
from qmag_ray.model import create_backbone, save_checkpoint

N_IMAGES = 24


def make_inputs(tmp_path: Path, shared_data: Path) -> tuple[Path, Path]:
    root = tmp_path / "images"
    for i in range(N_IMAGES):
        rel = root / f"id{i % 4}" / f"{i:03d}.jpg"
        rel.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "magface_toy" / f"{i % 10}.jpg", rel)
    torch.manual_seed(0)
    model = tmp_path / "m.pth"
    save_checkpoint(create_backbone("iresnet-demo").eval(), str(model), "iresnet-demo")
    return root, model


def rows(out: Path) -> list[str]:
    return [
        p
        for part in sorted((out / "embeddings").rglob("*.parquet"))
        for p in pq.read_table(part, columns=["path"]).column("path").to_pylist()
    ]


class Never:
    called = False

    def __call__(self) -> None:
        self.called = True
        raise AssertionError("Ray work started although the run should have been refused")


@pytest.mark.ray
def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(
    ray_cluster: None, tmp_path: Path, shared_data: Path
) -> None:
    root, model = make_inputs(tmp_path, shared_data)
    out = tmp_path / "out"
    cfg = EmbedConfig(
        images=str(root),
        model=str(model),
        arch="iresnet-demo",
        output=str(out),
        batch_size=4,
        read_block_rows=4,
    )
    result: dict[str, object] = {}

    def first() -> None:
        try:
            result["summary"] = run_embed(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    while not (out / lease.LEASE_NAME).exists() and thread.is_alive():
        time.sleep(0.05)
    assert thread.is_alive(), result  # the first run holds the lease while it works
    hook = Never()
    with pytest.raises(lease.LeaseHeldError) as refused:
        run_embed(cfg, connect=hook)
    thread.join()
    assert not hook.called
    message = str(refused.value)
    assert "embed by" in message and f"pid {os.getpid()}" in message
    assert socket.gethostname() in message
    assert "summary" in result, result
    paths = rows(out)
    assert len(paths) == N_IMAGES and len(set(paths)) == N_IMAGES  # one row per image
    assert lease.read_holder(str(out)) is None  # released
    # and once it is complete, a further run is refused as finished, not as leased
    with pytest.raises(EmbedError, match="already holds a finished embedding run"):
        run_embed(cfg, connect=Never())


@pytest.mark.ray
def test_the_lease_of_a_dead_writer_is_taken_over(
    ray_cluster: None, tmp_path: Path, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, model = make_inputs(tmp_path, shared_data)
    out = tmp_path / "out"
    out.mkdir()
    # a writer that took the lease and died: a real process, gone by now
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    now = time.time()
    record = {
        "token": "0" * 32,
        "purpose": "embed",
        "user": "someone",
        "host": socket.gethostname(),
        "pid": int(dead.stdout),
        "pid_start": "1",
        "created_utc": now,
        "heartbeat_utc": now,
        "ttl_s": 3600.0,
    }
    (out / lease.LEASE_NAME).write_text(json.dumps(record))
    cfg = EmbedConfig(
        images=str(root),
        model=str(model),
        arch="iresnet-demo",
        output=str(out),
        batch_size=8,
        read_block_rows=8,
    )
    with caplog.at_level(logging.WARNING, logger="qmag_ray.lease"):
        summary = run_embed(cfg)
    assert "took over the stale lease" in caplog.text
    assert (summary.inputs, summary.embedded) == (N_IMAGES, N_IMAGES)
    assert sorted(rows(out)) == sorted(f"id{i % 4}/{i:03d}.jpg" for i in range(N_IMAGES))
    assert lease.read_holder(str(out)) is None  # released
    assert json.loads((out / lease.LEASE_NAME).read_text())["generation"] == 2  # after the dead
