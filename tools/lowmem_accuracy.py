#!/usr/bin/env python
"""Accuracy of low-memory Adan (issue 11): 8-bit states and Kahan-compensated bf16 parameters vs fp32 Adan.

    python tools/lowmem_accuracy.py                     # every experiment, then docs/lowmem_accuracy.{md,png}
    python tools/lowmem_accuracy.py --report-only       # rewrite the page from the stored results
    python tools/lowmem_accuracy.py --tasks digits --configs fp32 8bit --seeds 0 --jobs 2

One training loop (below) runs every configuration, so the runs of one seed see the same
initial weights, the same augmented images in the same order and the same schedule: only
the optimizer configuration differs.  It reproduces the recipe of
configs/timm/demo/digits_test_resnet.yaml (what ``make train`` runs with tools/train_timm.py):
timm model, timm's train transform (RandomResizedCrop scale 0.7-1, ratio 0.85-1.18, bilinear,
no flips, mean/std 0.5), label smoothing 0.1, batch 64, Adan lr 1e-2 / wd 0.02 on weights
only (timm's grouping: no decay on 1-d parameters) / betas (0.98, 0.92, 0.99) /
max_grad_norm 5, timm's cosine schedule stepped per epoch (1 warm-up epoch at 1e-4,
min_lr 1e-5).  The harder task changes the model, the epochs and the training fraction (TASKS).

Every finished run is appended to ``<out>/results.jsonl`` (a rerun skips the runs it holds,
``--fresh`` starts over); the page is written from that file.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRITERION_POINTS = 0.5
BASELINE = "fp32"
MEAN = STD = (0.5, 0.5, 0.5)  # test_resnet's and vit's pretrained_cfg


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    model: str
    model_kwargs: Dict[str, Any]
    epochs: int
    train_fraction: float = 1.0  # of the 1437 training images, a fixed class-stratified subset
    lr: float = 1e-2
    weight_decay: float = 0.02
    batch_size: int = 64
    warmup_epochs: int = 1
    warmup_lr: float = 1e-4
    min_lr: float = 1e-5
    smoothing: float = 0.1
    scale: Tuple[float, float] = (0.7, 1.0)
    ratio: Tuple[float, float] = (0.85, 1.18)


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)
    param_dtype: torch.dtype = torch.float32


TASKS: Dict[str, Task] = {
    "digits": Task("digits", "digits demo: timm test_resnet, 8 epochs, all 1437 training images",
                   "test_resnet", {}, epochs=8),
    # Chosen by a quick measurement (docs/lowmem_accuracy.md, "The harder task"): a 4-block ViT of width
    # 64 on 8x8 patches of the 32 px digits, mean-pooled, batch 32, 10 epochs, ends near 92% with fp32
    # Adan: off the ceiling, so an optimizer that loses accuracy shows; about a minute per run.
    "vit": Task("vit", "small ViT (dim 64, depth 4, 4 heads, patch 8, mean-pooled), batch 32, 10 epochs",
                "vit_tiny_patch16_224",
                dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, global_pool="avg",
                     class_token=False),
                epochs=10, batch_size=32, lr=5e-3, weight_decay=0.02),
}

CONFIGS: Dict[str, Config] = {
    "fp32": Config("fp32", "fp32 parameters, fp32 states (fused)", dict(fused=True)),
    "8bit": Config("8bit", "fp32 parameters, 8-bit block-wise states (fused)", dict(fused=True, state_dtype="8bit")),
    "bf16state": Config("bf16state", "fp32 parameters, bf16 states (fused)",
                        dict(fused=True, state_dtype=torch.bfloat16)),
    "bf16": Config("bf16", "bf16 parameters and states, no compensation (fused)", dict(fused=True),
                   param_dtype=torch.bfloat16),
    "bf16kahan": Config("bf16kahan", "bf16 parameters and states, kahan_sum=True (fused)",
                        dict(fused=True, kahan_sum=True), param_dtype=torch.bfloat16),
}

# The experiments of issue 11: which configurations run on which task.
PLAN: Dict[str, Tuple[str, ...]] = {
    "digits": ("fp32", "8bit", "bf16state", "bf16", "bf16kahan"),
    "vit": ("fp32", "8bit", "bf16state"),
}
# The comparisons the issue asks for: (task, configuration) against (task, BASELINE).
CRITERIA: Tuple[Tuple[str, str], ...] = (("digits", "8bit"), ("vit", "8bit"), ("digits", "bf16kahan"))
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=2)
def digits_images(size: int = 32):
    """The 32 px RGB digits exactly as adan_plugin.data.write_digits_imagefolder writes them (PIL images)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from adan_plugin.data.digits import SPLIT_SEED, VAL_FRACTION, _split

    data = load_digits()
    images = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
    train_idx, val_idx = _split(len(images), VAL_FRACTION, SPLIT_SEED)

    def pil(i):
        return Image.fromarray(images[i], mode="L").resize((size, size), Image.BILINEAR).convert("RGB")

    train = [(pil(i), int(data.target[i])) for i in train_idx]
    val = [(pil(i), int(data.target[i])) for i in val_idx]
    return train, val


def stratified_subset(labels: Sequence[int], fraction: float, seed: int = 0) -> List[int]:
    """Indices of a fixed ``fraction`` of each class (the same subset for every run and seed)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    keep: List[int] = []
    labels = np.asarray(labels)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        keep.extend(rng.permutation(idx)[:max(1, int(round(len(idx) * fraction)))].tolist())
    return sorted(keep)


def train_transform(task: Task):
    from timm.data import create_transform
    return create_transform(32, is_training=True, scale=task.scale, ratio=task.ratio, hflip=0.0, vflip=0.0,
                            color_jitter=0.0, interpolation="bilinear", mean=MEAN, std=STD)


def eval_transform():
    from timm.data import create_transform
    return create_transform(32, is_training=False, crop_pct=1.0, interpolation="bilinear", mean=MEAN, std=STD)


def epoch_batches(images, labels, transform, batch_size: int, seed: int, epoch: int):
    """The epoch's augmented, shuffled batches; a function of (seed, epoch) only, not of the optimizer."""
    s = seed * 1000003 + 10007 * (epoch + 1)
    random.seed(s)
    torch.manual_seed(s)
    x = torch.stack([transform(img) for img in images])
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(s))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(y), batch_size)]


# ------------------------------------------------------------------------------------------ training
def build_optimizer(model: torch.nn.Module, task: Task, config: Config):
    from timm.optim._param_groups import param_groups_weight_decay

    from adan_plugin import Adan

    groups = param_groups_weight_decay(model, task.weight_decay)
    return Adan(groups, lr=task.lr, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=task.weight_decay,
                max_grad_norm=5.0, no_prox=False, **config.opt_kwargs)


def build_scheduler(optimizer, task: Task, epochs: int):
    from timm.scheduler import create_scheduler_v2
    sched, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, cooldown_epochs=0,
                                   min_lr=task.min_lr, warmup_lr=task.warmup_lr, warmup_epochs=task.warmup_epochs,
                                   step_on_epochs=True)
    return sched


@torch.no_grad()
def evaluate(model, x_val, y_val, dtype) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(y_val), 256):
        logits = model(x_val[i:i + 256].to(dtype)).float()
        hits += int((logits.argmax(1) == y_val[i:i + 256]).sum())
    return 100.0 * hits / len(y_val)


def run_one(task_name: str, config_name: str, seed: int, epochs: Optional[int] = None,
            train_limit: Optional[int] = None, threads: int = 1) -> Dict[str, Any]:
    """Train one (task, configuration, seed); returns the result row (curve = top-1 after each epoch).

    Runs with ``threads`` intra-op threads and restores the caller's count afterwards: a caller in
    the same process (the tests) would otherwise train with one thread, and a different thread
    count changes the rounding of reductions, hence the result of everything it runs next."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(task_name, config_name, seed, epochs, train_limit)
    finally:
        torch.set_num_threads(before)


def _train(task_name: str, config_name: str, seed: int, epochs: Optional[int],
           train_limit: Optional[int]) -> Dict[str, Any]:
    import timm
    from timm.loss import LabelSmoothingCrossEntropy

    import adan_plugin  # noqa: F401

    task, config = TASKS[task_name], CONFIGS[config_name]
    epochs = epochs or task.epochs
    train, val = digits_images()
    keep = stratified_subset([label for _, label in train], task.train_fraction)
    if train_limit:
        keep = keep[:train_limit]
    images, labels = [train[i][0] for i in keep], [train[i][1] for i in keep]
    tf_eval = eval_transform()
    x_val = torch.stack([tf_eval(img) for img, _ in val])
    y_val = torch.tensor([label for _, label in val])
    tf_train = train_transform(task)

    torch.manual_seed(seed)
    model = timm.create_model(task.model, num_classes=10, **task.model_kwargs).to(config.param_dtype)
    optimizer = build_optimizer(model, task, config)
    scheduler = build_scheduler(optimizer, task, epochs)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=task.smoothing)

    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    curve, losses, lrs, unchanged = [], [], [], []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        batches = epoch_batches(images, labels, tf_train, task.batch_size, seed, epoch)
        # Which weights a whole epoch of updates leaves bit-identical: the updates that rounding to
        # the parameter's dtype swallows (bf16 without compensation), ~0 for fp32 parameters.
        start = [p.detach().clone() for p in params]
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for x, y in batches:
            loss = loss_fn(model(x.to(config.param_dtype)).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * len(y)
        scheduler.step(epoch + 1)
        train_loss = float(loss_sum) / len(labels)
        if not math.isfinite(train_loss):
            raise RuntimeError(f"{task_name}/{config_name}/seed {seed}: loss {train_loss} in epoch {epoch}")
        losses.append(train_loss)
        unchanged.append(sum(int((p.detach() == s).sum()) for p, s in zip(params, start)) / n_params)
        curve.append(evaluate(model, x_val, y_val, config.param_dtype))
    return dict(task=task_name, config=config_name, seed=seed, epochs=epochs, train_images=len(labels),
                final_top1=curve[-1], curve=curve, train_loss=losses, lr=lrs, unchanged=unchanged,
                wall_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------- summary
def summarize(rows: Iterable[Dict[str, Any]]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """Per (task, configuration): seeds, mean / sample std of final top-1, mean curve, mean wall time."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["config"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        finals = np.array([r["final_top1"] for r in rs], dtype=np.float64)
        n_epochs = min(len(r["curve"]) for r in rs)
        out[key] = dict(seeds=[r["seed"] for r in rs], n=len(rs), mean=float(finals.mean()),
                        std=float(finals.std(ddof=1)) if len(rs) > 1 else 0.0,
                        curve=np.mean([r["curve"][:n_epochs] for r in rs], axis=0).tolist(),
                        train_loss=float(np.mean([r["train_loss"][-1] for r in rs])),
                        wall_s=float(np.mean([r["wall_s"] for r in rs])))
    return out


def compare(summary: Dict[Tuple[str, str], Dict[str, Any]], criteria=CRITERIA, baseline: str = BASELINE,
            points: float = CRITERION_POINTS) -> List[Dict[str, Any]]:
    """Each criterion (task, config): mean difference against the baseline and whether |diff| <= points.

    Missing runs give ``met=None`` (not decided), never a pass.  Only seeds both sides ran count.
    """
    out = []
    for task, config in criteria:
        a, b = summary.get((task, config)), summary.get((task, baseline))
        row = dict(task=task, config=config, baseline=baseline, points=points, diff=None, met=None,
                   mean=None, baseline_mean=None, seeds=[])
        if a is not None and b is not None:
            seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
            if seeds and seeds == sorted(a["seeds"]) == sorted(b["seeds"]):
                row.update(mean=a["mean"], baseline_mean=b["mean"], diff=a["mean"] - b["mean"], seeds=seeds)
                row["met"] = abs(row["diff"]) <= points
        out.append(row)
    return out


def paired_diffs(rows: Iterable[Dict[str, Any]], task: str, config: str, baseline: str = BASELINE):
    """Per-seed final top-1 differences config - baseline (same seed = same init and data)."""
    by = {(r["task"], r["config"], r["seed"]): r["final_top1"] for r in rows}
    return {s: by[(task, config, s)] - by[(task, baseline, s)]
            for (t, c, s) in sorted(by) if t == task and c == config and (task, baseline, s) in by}


# ------------------------------------------------------------------------------------------- report
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD's short hash, with ``-dirty`` when the optimizer, kernels or this script differ from it."""
    try:
        head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "diff", "--quiet", "HEAD", "--", "adan_plugin", "csrc",
                                "tools/lowmem_accuracy.py"]).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _verdict(met: Optional[bool]) -> str:
    return "not run" if met is None else ("**met**" if met else "**not met**")


def render_markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any], notes: str = "") -> str:
    summary = summarize(rows)
    # The verdicts use the issue's seeds only; more seeds, where run, get a supplementary table.
    verdict_rows = [r for r in rows if r["seed"] in SEEDS]
    extra_seeds = sorted({r["seed"] for r in rows} - set(SEEDS))
    lines = [
        "# Low-memory Adan: accuracy (issue 11)",
        "",
        f"Generated by `{meta.get('command', 'python tools/lowmem_accuracy.py')}` on {meta['date']}, "
        f"CPU: **{meta['cpu']}** ({meta['threads']} thread per run), torch {meta['torch']}, timm {meta['timm']}, "
        f"commit {meta['commit']}.",
        "",
        "Question: do 8-bit block-wise Adan states (`Adan(..., state_dtype=\"8bit\")`) and Kahan-compensated bf16 "
        f"parameters (`Adan(..., kahan_sum=True)`) keep fp32 Adan's accuracy?  Criterion (issue 11): the mean "
        f"final top-1 over {len(SEEDS)} seeds is within {CRITERION_POINTS} point of fp32 Adan's.",
        "",
        f"## Verdicts (seeds {', '.join(map(str, SEEDS))})",
        "",
    ]
    lines += _verdict_table(verdict_rows)
    supplementary = _verdict_table(rows, complete_only=True) if extra_seeds else []
    if len(supplementary) > 2:
        lines += ["", f"Supplementary, every seed run (also {', '.join(map(str, extra_seeds))}, where both sides "
                  "ran them): not the issue's criterion, a check of how much of a difference is seed noise.", ""]
        lines += supplementary
    lines += ["", "## Mean per configuration", "",
              "| task | configuration | what | seeds | mean top-1 | std | difference vs fp32 (same seeds) | final train loss | "
              "mean wall time (s) |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for (task, config), s in sorted(summary.items(), key=lambda kv: (_order(kv[0]))):
        paired = paired_diffs(rows, task, config) if config != BASELINE else {}
        diff = float(np.mean(list(paired.values()))) if paired else None  # over the seeds both ran
        lines.append(f"| {task} | {config} | {CONFIGS[config].title if config in CONFIGS else config} | "
                     f"{','.join(map(str, s['seeds']))} | {_fmt(s['mean'])} | {_fmt(s['std'] if s['n'] > 1 else None)} | "
                     f"{_fmt(diff, True)} | {s['train_loss']:.4f} | {s['wall_s']:.0f} |")
    lines += ["", "## Every run", "",
              "| task | configuration | seed | final top-1 | best top-1 | final train loss | wall time (s) | commit |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: _order((r["task"], r["config"])) + (r["seed"],)):
        lines.append(f"| {r['task']} | {r['config']} | {r['seed']} | {r['final_top1']:.2f} | {max(r['curve']):.2f} | "
                     f"{r['train_loss'][-1]:.4f} | {r['wall_s']:.0f} | {r.get('commit', '–')} |")
    lines += ["", "![top-1 per epoch, mean over seeds](lowmem_accuracy.png)", ""]
    lines += unchanged_table(rows)
    lines += ["## What was run", "", _what_was_run(), ""]
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


def _verdict_table(rows: List[Dict[str, Any]], complete_only: bool = False) -> List[str]:
    lines = ["| task | configuration | seeds | mean top-1 | fp32 Adan | difference | per-seed differences | "
             f"within {CRITERION_POINTS} point |", "|---|---|---|---:|---:|---:|---|---|"]
    for c in compare(summarize(rows)):
        if complete_only and c["met"] is None:
            continue
        per_seed = paired_diffs(rows, c["task"], c["config"])
        lines.append(f"| {c['task']} | {c['config']} | {','.join(map(str, c['seeds'])) or '–'} | {_fmt(c['mean'])} | "
                     f"{_fmt(c['baseline_mean'])} | {_fmt(c['diff'], True)} | "
                     f"{', '.join(_fmt(d, True) for d in per_seed.values()) or '–'} | {_verdict(c['met'])} |")
    return lines


def unchanged_table(rows: List[Dict[str, Any]]) -> List[str]:
    """Per (task, configuration) that recorded it: % of weights an epoch left bit-identical, mean over seeds."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        if r.get("unchanged"):
            groups.setdefault((r["task"], r["config"]), []).append(r)
    if not groups:
        return []
    width = max(len(r["unchanged"]) for rs in groups.values() for r in rs)

    def cells(values):
        return " | ".join(values + [""] * (width - len(values)))

    lines = ["## Updates lost to rounding", "",
             "Percentage of all weights that an epoch of updates left bit-identical (mean over seeds), and the "
             "epoch's learning rate.  With bf16 parameters and no compensation, an update smaller than half a "
             "bf16 step of the weight (2^-9 of its magnitude) is rounded away.", "",
             f"| task | configuration | seeds | {cells([f'epoch {e + 1}' for e in range(width)])} |",
             "|---|---|---|" + "---:|" * width]
    for task in sorted({t for t, _ in groups}, key=lambda t: _order((t, ""))):
        keys = sorted((k for k in groups if k[0] == task), key=_order)
        for key in keys:
            rs = sorted(groups[key], key=lambda r: r["seed"])
            n = min(len(r["unchanged"]) for r in rs)
            vals = np.mean([r["unchanged"][:n] for r in rs], axis=0)
            lines.append(f"| {task} | {key[1]} | {','.join(str(r['seed']) for r in rs)} | "
                         f"{cells([f'{100 * v:.1f}' for v in vals])} |")
        lr = groups[keys[0]][0].get("lr") or []
        lines.append(f"| {task} | *learning rate* | | {cells([f'{v:.1e}' for v in lr])} |")
    return lines + [""]


def _order(key: Tuple[str, str]) -> Tuple[int, int]:
    task, config = key
    tasks, configs = list(TASKS), list(CONFIGS)
    return (tasks.index(task) if task in tasks else len(tasks), configs.index(config) if config in configs
            else len(configs))


def _what_was_run() -> str:
    lines = ["One self-contained loop in `tools/lowmem_accuracy.py` trains every run; for a given seed, all "
             "configurations start from the same weights and see the same augmented images in the same order "
             "(the augmentation and shuffling are drawn from (seed, epoch) before the epoch trains), so the "
             "optimizer configuration is the only difference.  The recipe is the one of "
             "`configs/timm/demo/digits_test_resnet.yaml` (`make train`): the embedded digits at 32 px "
             "(1437 train / 360 val images, the same PIL rendering as `adan_plugin.data`), timm's train "
             "transform (RandomResizedCrop scale 0.7–1, ratio 0.85–1.18, bilinear, no flips, mean/std 0.5), "
             "label smoothing 0.1, batch 64 (the ViT task: 32, see the table), Adan betas (0.98, 0.92, 0.99), eps 1e-8, max_grad_norm 5, proximal "
             "weight decay on weights only (timm's grouping: none on 1-d parameters), timm's cosine schedule "
             "stepped per epoch (1 warm-up epoch at 1e-4, min_lr 1e-5).  Top-1 is on the 360 validation images "
             "after the last epoch.  It does not run `tools/train_timm.py` itself (no pure-bf16-parameter mode "
             "there, and a subprocess per run would draw different data per configuration only through the "
             "trainer's own seeding).", "",
             "| task | model | epochs | batch | training images | lr | weight decay |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for t in TASKS.values():
        kw = ", ".join(f"{k}={v}" for k, v in t.model_kwargs.items())
        lines.append(f"| {t.name} | timm `{t.model}`{f' ({kw})' if kw else ''} | {t.epochs} | {t.batch_size} | "
                     f"{int(round(t.train_fraction * 100))}% | {t.lr:g} | {t.weight_decay:g} |")
    lines += ["", "| configuration | parameters / states | `Adan` keywords |", "|---|---|---|"]
    for c in CONFIGS.values():
        kw = ", ".join(f"{k}={_kw(v)}" for k, v in c.opt_kwargs.items())
        lines.append(f"| {c.name} | {c.title} | `{kw}` |")
    lines += ["", "bf16 parameters: the model is cast to bf16 (`model.to(torch.bfloat16)`, BatchNorm included), "
              "inputs are bf16 and the logits are cast to fp32 for the loss; the states follow the parameters' "
              "dtype (`state_dtype=None`), i.e. pure-bf16 training as optimi's Kahan summation targets."]
    return "\n".join(lines)


def _kw(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def plot(rows: List[Dict[str, Any]], path: str, title: str = "") -> None:
    """Top row: top-1 per epoch, mean over seeds.  Bottom row: every seed's final top-1 per configuration,
    the mean (bar) and the band of fp32's mean +- the criterion."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    panels = [("digits", "digits demo: states (fp32 parameters)", ("fp32", "8bit", "bf16state")),
              ("digits", "digits demo: bf16 parameters", ("fp32", "bf16kahan", "bf16")),
              ("vit", "small ViT: states (fp32 parameters)", ("fp32", "8bit", "bf16state"))]
    panels = [(t, n, tuple(c for c in cs if (t, c) in summary)) for t, n, cs in panels]
    panels = [p for p in panels if p[2]]
    ncols = max(1, len(panels))
    fig, axes = plt.subplots(2, ncols, figsize=(5.0 * ncols, 7.6), squeeze=False,
                             gridspec_kw=dict(height_ratios=[3, 2]))
    styles = {"fp32": ("k", "-"), "8bit": ("tab:red", "--"), "bf16state": ("tab:blue", ":"),
              "bf16kahan": ("tab:green", "--"), "bf16": ("tab:orange", "-.")}
    for col, (task, name, configs) in enumerate(panels):
        ax, bx = axes[0][col], axes[1][col]
        for i, config in enumerate(configs):
            s = summary[(task, config)]
            color, ls = styles.get(config, (None, "-"))
            ax.plot(np.arange(1, len(s["curve"]) + 1), s["curve"], color=color, linestyle=ls, marker="o", ms=3,
                    label=f"{config}: {s['mean']:.2f} (n={s['n']})")
            runs = sorted((r["seed"], r["final_top1"]) for r in rows if r["task"] == task and r["config"] == config)
            bx.scatter([i + 0.08 * (k - (len(runs) - 1) / 2) for k in range(len(runs))], [f for _, f in runs],
                       color=color, s=18, zorder=3)
            bx.hlines(s["mean"], i - 0.3, i + 0.3, color=color, lw=2)
        base = summary.get((task, BASELINE))
        if base is not None:
            bx.axhspan(base["mean"] - CRITERION_POINTS, base["mean"] + CRITERION_POINTS, color="0.85", zorder=0,
                       label=f"fp32 mean +- {CRITERION_POINTS}")
            bx.legend(fontsize=8, loc="lower right")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%), mean over seeds")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        bx.set_xticks(range(len(configs)))
        bx.set_xticklabels(configs)
        bx.set_xlim(-0.6, len(configs) - 0.4)
        bx.set_ylabel("final top-1 (%), each seed")
        bx.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
