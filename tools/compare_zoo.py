#!/usr/bin/env python
"""Compare training curves (summary.csv) with the Adan model zoo.

    python tools/compare_zoo.py output/train/res50/summary.csv --zoo res50_100 --out res50.png
    python tools/compare_zoo.py run_a/summary.csv run_b/summary.csv --labels Adan AdamW --out ab.png
    python tools/compare_zoo.py ../shared/zoo/timm/ViT/small/summary_vit-s_150.csv --out zoo.png

Plots eval_top1 and train_loss per epoch for every file (ours or zoo logs)
and the zoo curve of ``--zoo`` to a PNG, and prints final and best top-1 side
by side.  ``--zoo`` takes a run name from configs/timm/zoo_results.csv (the
config's file name) or a CSV path; the zoo's per-epoch logs are read from
``--zoo-dir`` (default ../shared/zoo next to the repository) when present,
otherwise the shipped final/best numbers are printed and drawn as a line.

Zoo logs of resumed runs repeat their header line mid-file; such lines are
skipped and a repeated epoch keeps its last row.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO_TABLE = os.path.join(REPO_ROOT, "configs", "timm", "zoo_results.csv")
DEFAULT_ZOO_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "zoo")
REQUIRED = ("epoch", "eval_top1")


class CompareError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"compare_zoo.py: error: {message}")


def read_summary(path: str) -> Dict[str, List[float]]:
    """Columns of a summary.csv as float lists, one entry per epoch (ascending)."""
    if not os.path.isfile(path):
        raise CompareError(f"{path}: no such file")
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    lines = [ln for ln in lines if ln and any(c.strip() for c in ln)]
    if not lines:
        raise CompareError(f"{path}: empty file, expected a header line with {', '.join(REQUIRED)}")
    header = [c.strip() for c in lines[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise CompareError(f"{path}: not a summary.csv: the header {header} lacks {missing}")
    by_epoch: Dict[int, Dict[str, float]] = {}
    for lineno, row in enumerate(lines[1:], start=2):
        cells = [c.strip() for c in row]
        if cells == header:  # a resumed run wrote its header again
            continue
        if len(cells) != len(header):
            raise CompareError(f"{path}:{lineno}: {len(cells)} fields, the header has {len(header)}")
        try:
            values = {name: float(cell) if cell else math.nan for name, cell in zip(header, cells)}
        except ValueError:
            raise CompareError(f"{path}:{lineno}: non-numeric value in {row}") from None
        by_epoch[int(values["epoch"])] = values  # a re-run epoch keeps its last row
    if not by_epoch:
        raise CompareError(f"{path}: a header but no epochs")
    epochs = sorted(by_epoch)
    return {name: [by_epoch[e][name] for e in epochs] for name in header}


def final_best(curve: Dict[str, List[float]]) -> Dict[str, float]:
    top1 = curve["eval_top1"]
    best_i = max(range(len(top1)), key=lambda i: top1[i])
    return {"epochs": len(top1), "final": top1[-1], "best": top1[best_i], "best_epoch": curve["epoch"][best_i]}


def zoo_table(path: str = ZOO_TABLE) -> Dict[str, Dict[str, str]]:
    if not os.path.isfile(path):
        raise CompareError(f"{path}: the shipped zoo table is missing")
    with open(path, newline="") as f:
        return {row["config"]: row for row in csv.DictReader(f)}


def resolve_zoo(name: str, zoo_dir: str):
    """(label, curve or None, reference row or None) for --zoo NAME|PATH."""
    if os.path.isfile(name) or name.endswith(".csv"):
        return os.path.basename(name), read_summary(name), None
    table = zoo_table()
    key = name[:-5] if name.endswith(".yaml") else os.path.basename(name)
    if key not in table:
        raise CompareError(f"unknown zoo run {name!r}; known: {', '.join(sorted(table))}")
    ref = table[key]
    csv_path = os.path.join(zoo_dir, ref["zoo_csv"])
    curve = read_summary(csv_path) if os.path.isfile(csv_path) else None
    return f"zoo {key}", curve, ref


def plot_curves(curves: Dict[str, Dict[str, List[float]]], out_png: str, title: str = "",
                ref_lines: Optional[Dict[str, float]] = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, c in curves.items():
        ax_acc.plot(c["epoch"], c["eval_top1"], label=label)
        if "train_loss" in c:
            ax_loss.plot(c["epoch"], c["train_loss"], label=label)
    for label, value in (ref_lines or {}).items():
        ax_acc.axhline(value, linestyle="--", color="gray", label=label)
    ax_acc.set(xlabel="epoch", ylabel="eval top-1 (%)", title="eval_top1")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="train_loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+", help="summary.csv files to plot")
    ap.add_argument("--labels", nargs="+", default=None, help="one label per summary file")
    ap.add_argument("--zoo", default=None, help="zoo run (config name, e.g. res50_100) or a zoo CSV path")
    ap.add_argument("--zoo-dir", default=DEFAULT_ZOO_DIR, help="the zoo data (default: ../shared/zoo)")
    ap.add_argument("--out", default="compare.png", help="PNG to write")
    args = ap.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.summaries):
        raise CompareError(f"{len(args.labels)} labels for {len(args.summaries)} summary files")
    labels = args.labels or list(args.summaries)

    curves = {label: read_summary(path) for label, path in zip(labels, args.summaries)}
    refs: Dict[str, float] = {}
    stats = {label: final_best(c) for label, c in curves.items()}
    if args.zoo:
        zlabel, zcurve, ref = resolve_zoo(args.zoo, args.zoo_dir)
        if zcurve is not None:
            curves[zlabel] = zcurve
            stats[zlabel] = final_best(zcurve)
        elif ref is not None:
            print(f"note: {args.zoo_dir} has no {ref['zoo_csv']}; using the shipped final/best numbers")
            refs[f"{zlabel} final"] = float(ref["top1_final"])
            stats[zlabel] = {"epochs": int(ref["epochs"]) + int(ref["cooldown_epochs"]),
                             "final": float(ref["top1_final"]), "best": float(ref["top1_best"]),
                             "best_epoch": math.nan}
    plot_curves(curves, args.out, ref_lines=refs)

    width = max(len(k) for k in stats)
    print(f"{'run':<{width}}  {'epochs':>6}  {'final top-1':>11}  {'best top-1':>10}  {'best epoch':>10}")
    for label, s in stats.items():
        be = "" if math.isnan(s["best_epoch"]) else f"{int(s['best_epoch'])}"
        print(f"{label:<{width}}  {s['epochs']:>6}  {s['final']:>11.2f}  {s['best']:>10.2f}  {be:>10}")
    print(f"plot: {args.out}")
    return stats


if __name__ == "__main__":
    main()
