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

``--finetuned PATH --name NAME`` skips step 1 and evaluates a checkpoint trained elsewhere (the
whole network with ``qmag-ray train --init-checkpoint ... --dropout P``) under ``OUT/NAME``.
The loop itself (decoding, the actor over the set, Spearman, the evaluation) is
``serfiq_eval.py``'s, shared with ``serfiq_sweep.py`` and ``bench_serfiq.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from serfiq_eval import decode_set, degradation_spearman, embed_set, evaluate_qualities

from qmag_ray.embedding.actor import EmbedActor
from qmag_ray.embeddings import load_embeddings
from qmag_ray.model import save_checkpoint
from qmag_ray.training.config import TrainConfig
from qmag_ray.training.data import FaceDataset, collate, list_labelled_images
from qmag_ray.training.loop import build_net, lr_factor, make_optimizer, train_step

DEMO = "qmag_ray/assets/demo_iresnet.pth"


def finetune(args: argparse.Namespace, target: Path) -> None:
    cfg = TrainConfig(
        data=args.train,
        output=str(target.parent),
        init_checkpoint=args.init,
        lr=args.lr,
        dropout=args.dropout,
        seed=args.seed,
        batch_size=64,
    )
    torch.manual_seed(args.seed)
    images = list_labelled_images(cfg.data)
    loader = torch.utils.data.DataLoader(
        FaceDataset(images, flip=args.flip, seed=args.seed),
        batch_size=64,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
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
    manifest, batch = decode_set(args.eval)
    actor = EmbedActor(
        model,
        "iresnet-demo",
        threads=args.threads,
        serfiq={
            "passes": args.passes,
            "dropout": args.serfiq_dropout,
            "seed": 0,
            "dropout_type": args.serfiq_dropout_type,
        },
    )
    embed_set(actor, manifest, batch, out)


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
    p.add_argument(
        "--finetuned",
        help="evaluate this checkpoint (e.g. from qmag-ray train --dropout) instead of training",
    )
    p.add_argument("--init", default=DEMO, help="checkpoint the whole-network fine-tune begins at")
    p.add_argument("--flip", action="store_true", help="random horizontal flips in the fine-tune")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tune's shuffling")
    p.add_argument("--name", default="finetuned", help="folder of the fine-tuned model in OUT")
    p.add_argument("--serfiq-dropout-type", default="element", choices=["element", "channel"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tuned = Path(args.finetuned) if args.finetuned else out / args.name / "magface_dropout.pth"
    if not (args.skip_train or args.finetuned):
        tuned.parent.mkdir(parents=True, exist_ok=True)
        (finetune_head if args.head_only else finetune)(args, tuned)
    manifest = pd.read_parquet(f"{args.eval}/manifest.parquet").set_index("path")
    models = [("bundled", DEMO), (args.name, str(tuned))]
    for name, model in models[1:] if args.only_finetuned else models:
        folder = out / name
        t = time.perf_counter()
        if not (folder / "embeddings").exists():
            embed(model, args, folder)
        table = load_embeddings(str(folder))
        serfiq = pq.read_table(folder / "embeddings" / "part-00000.parquet").column("serfiq")
        rho = degradation_spearman(
            manifest.loc[list(table.path), "degradation"].to_numpy(),
            norm=np.asarray(table.quality),
            serfiq=serfiq.to_numpy(),
        )
        print(
            f"{name}: embedded {len(table)} in {time.perf_counter() - t:.0f} s; "
            f"Spearman(norm, degradation) {rho['norm']:.3f}, "
            f"Spearman(serfiq, degradation) {rho['serfiq']:.3f}",
            flush=True,
        )
        result = evaluate_qualities(folder, args.eval, args.alpha, args.beta, ["quality", "serfiq"])
        print(result.summary(), flush=True)


if __name__ == "__main__":
    main()
