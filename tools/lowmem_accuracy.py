#!/usr/bin/env python
"""Accuracy of low-memory Adan (issue 11): 8-bit states and Kahan-compensated bf16 parameters vs fp32 Adan.

    python tools/lowmem_accuracy.py                     # every experiment, then docs/lowmem_accuracy.{md,png}
    python tools/lowmem_accuracy.py --report-only       # rewrite the page from the stored results
    python tools/lowmem_accuracy.py --tasks digits --configs fp32 8bit --seeds 0 --jobs 2

One training loop (``accuracy/training.py``) runs every configuration, so the runs of one seed see the same
initial weights, the same augmented images in the same order and the same schedule: only
the optimizer configuration differs.  It reproduces the recipe of
configs/timm/demo/digits_test_resnet.yaml (what ``make train`` runs with tools/train_timm.py):
timm model, timm's train transform (RandomResizedCrop scale 0.7-1, ratio 0.85-1.18, bilinear,
no flips, mean/std 0.5), label smoothing 0.1, batch 64, Adan lr 1e-2 / wd 0.02 on weights
only (timm's grouping: no decay on 1-d parameters) / betas (0.98, 0.92, 0.99) /
max_grad_norm 5, timm's cosine schedule stepped per epoch (1 warm-up epoch at 1e-4,
min_lr 1e-5).  The harder task changes the model, the epochs and the training fraction (TASKS).

Every finished run is appended to ``<out>/results.jsonl`` (a rerun skips the runs it holds,
``--fresh`` starts over); the page is written from that file.  The pieces live in ``accuracy/``
(experiments, data, training, summary, report); this file is the command line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the accuracy package, also when loaded by path
from accuracy.data import digits_images, epoch_batches, eval_transform, stratified_subset, train_transform  # noqa: E402
from accuracy.experiments import (BASELINE, CONFIGS, CRITERIA, CRITERION_POINTS, PLAN, REPO_ROOT, SEEDS,  # noqa: E402
                                  TASKS, Config, Task)
from accuracy.report import _fmt, _verdict, cpu_model, git_commit, plot, render_markdown, unchanged_table  # noqa: E402
from accuracy.summary import compare, paired_diffs, summarize  # noqa: E402
from accuracy.training import build_optimizer, build_scheduler, evaluate, run_one  # noqa: E402

# Re-exported: the names tests/test_lowmem_accuracy.py and earlier callers of the single-file tool use.
__all__ = [
    "BASELINE", "CONFIGS", "CRITERIA", "CRITERION_POINTS", "PLAN", "REPO_ROOT", "SEEDS", "TASKS", "Config", "Task",
    "build_optimizer", "build_scheduler", "compare", "cpu_model", "digits_images", "epoch_batches", "eval_transform",
    "evaluate", "git_commit", "main", "paired_diffs", "plan_jobs", "plot", "read_results", "render_markdown",
    "run_one", "stratified_subset", "summarize", "train_transform", "unchanged_table",
]


# --------------------------------------------------------------------------------------------- CLI
def read_results(path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _worker(job):
    task, config, seed, epochs, train_limit = job
    try:
        return run_one(task, config, seed, epochs=epochs, train_limit=train_limit)
    except Exception as exc:  # reported, the other runs go on
        return dict(task=task, config=config, seed=seed, error=f"{type(exc).__name__}: {exc}")


def plan_jobs(tasks: Sequence[str], configs: Optional[Sequence[str]], seeds: Sequence[int]):
    jobs = []
    for task in tasks:
        for config in PLAN[task]:
            if configs is None or config in configs:
                jobs.extend((task, config, s) for s in seeds)
    return jobs


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None, help="default: the PLAN")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (1 thread each)")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "output", "lowmem_accuracy"),
                    help="results.jsonl lives here")
    ap.add_argument("--doc", default=os.path.join(REPO_ROOT, "docs", "lowmem_accuracy.md"))
    ap.add_argument("--notes", default=os.path.join(REPO_ROOT, "docs", "lowmem_accuracy_notes.md"),
                    help="hand-written text appended to the page when the file exists")
    ap.add_argument("--epochs", type=int, default=None, help="override (smoke runs)")
    ap.add_argument("--train-limit", type=int, default=None, help="at most this many training images (smoke)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="discard the stored results first")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    if args.fresh and os.path.exists(results_path):
        os.remove(results_path)
    rows = read_results(results_path)
    failures = []
    if not args.report_only:
        done = {(r["task"], r["config"], r["seed"]) for r in rows}
        jobs = [j + (args.epochs, args.train_limit) for j in plan_jobs(args.tasks, args.configs, args.seeds)
                if j not in done]
        print(f"{len(jobs)} runs to do ({len(done)} stored in {results_path})", flush=True)
        commit = git_commit()
        ctx = mp.get_context("spawn")
        with ctx.Pool(max(1, args.jobs), maxtasksperchild=1) if args.jobs > 1 else _Inline() as pool:
            for r in pool.imap_unordered(_worker, jobs):
                if "error" in r:
                    failures.append(r)
                    print(f"FAILED {r['task']}/{r['config']}/seed {r['seed']}: {r['error']}", flush=True)
                    continue
                r["commit"] = commit
                with open(results_path, "a") as f:
                    f.write(json.dumps(r) + "\n")
                rows.append(r)
                print(f"{r['task']:7s} {r['config']:10s} seed {r['seed']}  top-1 {r['final_top1']:6.2f}  "
                      f"curve {' '.join(f'{c:.1f}' for c in r['curve'])}  {r['wall_s']:.0f}s", flush=True)
    if not rows:
        print("no results to report", file=sys.stderr)
        return 1
    import timm
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                cpu=cpu_model(), threads=1, torch=torch.__version__, timm=timm.__version__, commit=git_commit(),
                command="python tools/lowmem_accuracy.py" + (" " + " ".join(argv) if argv else ""))
    notes = open(args.notes).read() if args.notes and os.path.exists(args.notes) else ""
    os.makedirs(os.path.dirname(os.path.abspath(args.doc)), exist_ok=True)
    with open(args.doc, "w") as f:
        f.write(render_markdown(rows, meta, notes))
    plot(rows, os.path.splitext(args.doc)[0] + ".png", title=f"{meta['cpu']}, {meta['date']}")
    for c in compare(summarize([r for r in rows if r["seed"] in SEEDS])):
        print(f"{c['task']}/{c['config']} vs {c['baseline']}: diff {_fmt(c['diff'], True)} -> {_verdict(c['met'])}")
    print(f"wrote {args.doc}")
    return 1 if failures else 0


class _Inline:
    """Pool stand-in for --jobs 1: runs in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, jobs):
        return map(fn, jobs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
