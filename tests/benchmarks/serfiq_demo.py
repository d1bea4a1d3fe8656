"""SER-FIQ on the demo data: a short dropout fine-tune, embeddings with norm and SER-FIQ,
Spearman with the synthetic degradation, then ``run_evaluation`` for the quality EDC.

Run by hand (in this process, no Ray: the same library pieces ``qmag-ray train`` and
``qmag-ray embed`` run on their workers; used when the shared machine is too loaded for Ray to
start)::

    .venv/bin/python tests/benchmarks/serfiq_demo.py --train /tmp/qs/train-s1 \\
        --eval /tmp/qs/demo-s2 --out /tmp/qs/serfiq-demo --steps 110 --dropout 0.4

1. fine-tunes the bundled demo model on ``--train`` for ``--steps`` SGD steps with the head's
   dropout at ``--dropout`` (``build_net``/``train_step`` of ``qmag_ray.training.loop``, lr
   ``--lr`` with warm-up and cosine decay, a new margin head), saved in the MagFace layout;
2. embeds ``--eval`` with the bundled and the fine-tuned model through ``EmbedActor`` with
   SER-FIQ (``--passes`` passes at ``--serfiq-dropout``), written as embeddings parts with a
   ``serfiq`` column under ``OUT/<model>/embeddings``;
3. prints Spearman(norm, degradation) and Spearman(serfiq, degradation) per model and runs the
   evaluation (generated pairs, QMagFace at ``--alpha``/``--beta``, EDC of ``quality`` and
   ``serfiq``, bootstrap intervals, the ``pose_band`` group report) into ``OUT/<model>/eval``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from scipy.stats import spearmanr

from qmag_ray.embedding.actor import EmbedActor
from qmag_ray.embedding.inputs import read_and_decode
from qmag_ray.embedding.output import embedding_batch
from qmag_ray.embeddings import load_embeddings
from qmag_ray.model import save_checkpoint
from qmag_ray.pairs.generate import generate_pairs
from qmag_ray.training.config import TrainConfig
from qmag_ray.training.data import FaceDataset, collate, list_labelled_images
from qmag_ray.training.loop import build_net, lr_factor, make_optimizer, train_step

DEMO = "qmag_ray/assets/demo_iresnet.pth"


def finetune(args: argparse.Namespace, target: Path) -> None:
    cfg = TrainConfig(
        data=args.train,
        output=str(target.parent),
        init_checkpoint=DEMO,
        lr=args.lr,
        dropout=args.dropout,
        seed=0,
        batch_size=64,
    )
    torch.manual_seed(0)
    images = list_labelled_images(cfg.data)
    loader = torch.utils.data.DataLoader(
        FaceDataset(images, seed=0),
        batch_size=64,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    net = build_net(cfg, images.num_classes)
    opt = make_optimizer(cfg, net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.steps))
    step, started = 0, time.perf_counter()
    while step < args.steps:
        for x, y, _ in loader:
            m = train_step(net, opt, sched, x, y)
            step += 1
            if step % 10 == 0:
                print(
                    f"step {step}: loss {m['loss']:.3f} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            if step >= args.steps:
                break
    save_checkpoint(net.backbone.eval(), str(target), "iresnet-demo")


def finetune_head(args: argparse.Namespace, target: Path) -> None:
    """``--head-only``: fine-tune only the head (BatchNorm, dropout, linear, BatchNorm: where
    SER-FIQ's dropout acts) with its dropout at ``--dropout`` and the MagFace loss, on trunk
    outputs computed once (the trunk frozen, in eval mode): ``--steps`` SGD steps cost
    seconds instead of a full network's minutes each on a loaded machine."""
    cfg = TrainConfig(
        data=args.train,
        output=str(target.parent),
        init_checkpoint=DEMO,
        lr=args.lr,
        dropout=args.dropout,
        seed=0,
        batch_size=64,
    )
    torch.manual_seed(0)
    images = list_labelled_images(cfg.data)
    loader = torch.utils.data.DataLoader(
        FaceDataset(images, seed=0), batch_size=64, shuffle=False, collate_fn=collate
    )
    net = build_net(cfg, images.num_classes)
    backbone = net.backbone.eval()
    feats, labels = [], []
    with torch.inference_mode():
        for x, y, _ in loader:
            feats.append(backbone.trunk(x))
            labels.append(y)
    trunk_out, y_all = torch.cat(feats), torch.cat(labels)
    for module in (backbone.bn2, backbone.dropout, backbone.features):
        module.train()
    head_params = [
        *backbone.bn2.parameters(),
        *backbone.fc.parameters(),
        *backbone.features.parameters(),
        *net.head.parameters(),
    ]
    opt = make_optimizer(cfg, head_params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.steps))
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.steps):
        pick = torch.randint(0, len(y_all), (64,), generator=gen)
        loss, parts = net.head(backbone.head(trunk_out[pick]), y_all[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(
                f"head step {step + 1}: loss {float(loss):.3f} acc "
                f"{float(parts.get('acc', float('nan'))):.3f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    save_checkpoint(backbone.eval(), str(target), "iresnet-demo")


def embed(model: str, args: argparse.Namespace, out: Path) -> None:
    manifest = pd.read_parquet(f"{args.eval}/manifest.parquet")
    actor = EmbedActor(
        model,
        "iresnet-demo",
        threads=args.threads,
        serfiq={"passes": args.passes, "dropout": args.serfiq_dropout, "seed": 0},
    )
    batches = []
    for start in range(0, len(manifest), 64):
        part = manifest.iloc[start : start + 64]
        batch = read_and_decode(
            {
                "shard": np.zeros(len(part), np.int64),
                "pos": np.arange(start, start + len(part)),
                "path": part["path"].to_numpy(object),
                "identity": part["identity"].to_numpy(object),
            },
            root=args.eval,
            resize=False,
        )
        r = actor(batch)
        batches.append(
            embedding_batch(
                part["path"].to_numpy(object),
                part["identity"].to_numpy(object),
                r["embedding"],
                {"serfiq": r["serfiq"]},
            )
        )
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_batches(batches), out / "embeddings" / "part-00000.parquet")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=110)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.4)
    p.add_argument("--passes", type=int, default=100)
    p.add_argument("--serfiq-dropout", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.0830)
    p.add_argument("--beta", type=float, default=0.1229)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--head-only", action="store_true", help="fine-tune only the head")
    p.add_argument("--only-finetuned", action="store_true", help="skip the bundled model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tuned = out / "finetuned" / "magface_dropout.pth"
    if not args.skip_train:
        tuned.parent.mkdir(parents=True, exist_ok=True)
        (finetune_head if args.head_only else finetune)(args, tuned)
    manifest = pd.read_parquet(f"{args.eval}/manifest.parquet").set_index("path")
    models = [("bundled", DEMO), ("finetuned", str(tuned))]
    for name, model in models[1:] if args.only_finetuned else models:
        folder = out / name
        t = time.perf_counter()
        if not (folder / "embeddings").exists():
            embed(model, args, folder)
        table = load_embeddings(str(folder))
        serfiq = pq.read_table(folder / "embeddings" / "part-00000.parquet").column("serfiq")
        d = manifest.loc[list(table.path), "degradation"].to_numpy()
        print(
            f"{name}: embedded {len(table)} in {time.perf_counter() - t:.0f} s; "
            f"Spearman(norm, degradation) {spearmanr(table.quality, d).correlation:.3f}, "
            f"Spearman(serfiq, degradation) "
            f"{spearmanr(serfiq.to_numpy(), d).correlation:.3f}",
            flush=True,
        )
        resolved = generate_pairs(table, 10, 5, 0)
        pairs = pd.DataFrame(
            {
                "a": table.path[resolved.idx_a],
                "b": table.path[resolved.idx_b],
                "label": resolved.label,
            }
        )
        pairs.to_csv(folder / "pairs.csv", index=False)
        from qmag_ray.config import load_config
        from qmag_ray.workflows.config import EvaluateConfig
        from qmag_ray.workflows.evaluate import run_evaluation

        cfg = load_config(
            EvaluateConfig,
            None,
            {
                "embeddings": str(folder),
                "pairs": str(folder / "pairs.csv"),
                "output": str(folder / "eval"),
                "alpha": args.alpha,
                "beta": args.beta,
                "quality.compare": ["quality", "serfiq"],
                "report.groups": ["pose_band"],
                "report.group_file": f"{args.eval}/manifest.parquet",
                "on_duplicate": "skip",
            },
        )
        print(run_evaluation(cfg, use_ray=False).summary(), flush=True)


if __name__ == "__main__":
    main()
