#!/usr/bin/env python
"""Short Adan training on scikit-learn's digits (ships with the package): prints top-1.

    python tools/quickstart_digits.py [--epochs 15] [--opt adan|adamw]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from adan_plugin import Adan
from adan_plugin.data import digits_tensors


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--opt", choices=["adan", "adamw"], default="adan")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-2 for Adan, 2e-3 for AdamW")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    x_tr, y_tr, x_va, y_va = digits_tensors()
    model = small_cnn()
    if args.opt == "adan":
        opt = Adan(model.parameters(), lr=args.lr or 1e-2, weight_decay=0.02, max_grad_norm=5.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr or 2e-3, weight_decay=0.05)
    steps = args.epochs * ((len(y_tr) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps,
                                                pct_start=0.1)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_tr))
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(x_va).argmax(1) == y_va).float().mean().item() * 100
        print(f"epoch {epoch + 1:3d}  train_loss {total / len(y_tr):.4f}  val_top1 {acc:6.2f}%  "
              f"({time.time() - t0:.1f}s)", flush=True)
    print(f"final val top-1 ({args.opt}): {acc:.2f}%")


if __name__ == "__main__":
    main()
