#!/usr/bin/env python
"""Train a timm model with Adan from a zoo recipe (configs/timm/*.yaml) -- or launch timm's train.py.

    python tools/train_timm.py --config configs/timm/vit-s_150-I.yaml --data-dir /data/imagenet
    torchrun --nproc-per-node 8 tools/train_timm.py --config configs/timm/res50_100.yaml --data-dir ...
    python tools/train_timm.py --config configs/timm/demo/digits_resnet10t.yaml     # embedded digits, CPU
    python tools/train_timm.py --launch /path/to/timm/train.py --config configs/timm/res50_100.yaml ...

The recipe YAMLs use timm train.py's argument names (the zoo's ``args_*.yaml``
load unchanged); every key can be overridden on the command line
(``--lr 0.01``, ``--opt-betas 0.98 0.92 0.99``, ``--max-grad-norm 5``,
``--no-prox false``, ``--bias-decay true``).  Without ``--data-dir`` the
embedded dataset is used: scikit-learn's digits written once as an
ImageFolder in the cache folder.

The output folder holds ``args.yaml``, ``summary.csv`` (epoch, train_loss,
eval_loss, eval_top1, eval_top5, lr), ``summary.png`` and checkpoints
(``last.pth.tar``, ``model_best.pth.tar``, ``checkpoint-<epoch>.pth.tar``)
that load with ``torch.load(weights_only=True)``.  ``--resume <checkpoint>``
continues a run, epoch numbering, schedule and RNG streams included.

``--launch PATH`` runs an upstream timm ``train.py`` unmodified instead, with
adan_plugin registered (``--opt adan`` is our Adan) and the Adan keys
(``max_grad_norm``, ``no_prox``, ``bias_decay``, from ``--config`` or the
command line) passed to the optimizer through ``--opt-kwargs``.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import yaml

import adan_plugin  # noqa: F401  (registers Adan into timm)
from adan_plugin.hparams import SCRATCH_LR_SCALE

SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")
CHECKPOINT_VERSION = 1


class ConfigError(SystemExit):
    """A user error: a message and exit status 2, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"train_timm.py: error: {message}")


# ------------------------------------------------------------------ arguments
def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _opt_float(value: str) -> Optional[float]:
    return None if str(value).lower() in ("none", "null") else float(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name, *aliases, **kw):
        # dest is timm train.py's (and the YAML's) key: --opt-betas -> opt_betas
        dest = name.lstrip("-").replace("-", "_")
        if kw.get("type") is _bool:
            kw.setdefault("nargs", "?")
            kw.setdefault("const", True)
        p.add_argument(name, *aliases, dest=dest, **kw)

    add("--config", "-c", default="", help="recipe YAML (timm train.py argument names)")
    p.add_argument("--launch", default="", metavar="TRAIN_PY",
                   help="run this upstream timm train.py with adan_plugin registered; the remaining "
                        "arguments go to it")
    # data
    add("--data-dir", default=None, help="dataset root; default: the embedded digits ImageFolder")
    add("--dataset", default="")
    add("--train-split", default="train")
    add("--val-split", default="validation")
    add("--class-map", default="")
    # model
    add("--model", default="resnet50")
    add("--pretrained", type=_bool, default=False)
    add("--initial-checkpoint", default="")
    add("--resume", default="", help="checkpoint to continue from (last.pth.tar)")
    add("--no-resume-opt", type=_bool, default=False)
    add("--num-classes", type=int, default=None)
    add("--gp", default=None)
    add("--img-size", type=int, default=None)
    add("--in-chans", type=int, default=None)
    add("--input-size", type=int, nargs=3, default=None)
    add("--crop-pct", type=_opt_float, default=None)
    add("--mean", type=float, nargs="+", default=None)
    add("--std", type=float, nargs="+", default=None)
    add("--interpolation", default="")
    add("--batch-size", "-b", type=int, default=128, help="per process")
    add("--validation-batch-size", type=int, default=None)
    add("--grad-accum-steps", type=int, default=1,
        help="accumulate gradients over N batches (keeps a recipe's global batch on fewer GPUs)")
    add("--channels-last", type=_bool, default=False)
    add("--grad-checkpointing", type=_bool, default=False)
    # optimizer
    add("--opt", default="sgd")
    add("--opt-eps", type=_opt_float, default=None)
    add("--opt-betas", type=float, nargs="+", default=None)
    add("--momentum", type=float, default=0.9)
    add("--weight-decay", type=float, default=2e-5)
    add("--clip-grad", type=_opt_float, default=None, help="timm's clipping (separate from Adan's max_grad_norm)")
    add("--clip-mode", default="norm")
    add("--layer-decay", type=_opt_float, default=None)
    add("--max-grad-norm", type=float, default=0.0, help="Adan: global gradient-norm clip (0 = off)")
    add("--no-prox", type=_bool, default=False, help="Adan: decoupled instead of proximal weight decay")
    add("--bias-decay", type=_bool, default=False,
        help="weight decay on every parameter, 1-d ones (biases, norms) included")
    from timm.utils import ParseKwargs
    add("--opt-kwargs", nargs="*", default={}, action=ParseKwargs, help="extra optimizer arguments k=v")
    # schedule
    add("--sched", default="cosine")
    add("--sched-on-updates", type=_bool, default=False)
    add("--lr", type=float, default=None)
    add("--lr-noise", type=float, nargs="+", default=None)
    add("--lr-noise-pct", type=float, default=0.67)
    add("--lr-noise-std", type=float, default=1.0)
    add("--lr-cycle-mul", type=float, default=1.0)
    add("--lr-cycle-decay", type=float, default=0.5)
    add("--lr-cycle-limit", type=int, default=1)
    add("--lr-k-decay", type=float, default=1.0)
    add("--warmup-lr", type=float, default=1e-5)
    add("--min-lr", type=float, default=0.0)
    add("--epochs", type=int, default=300)
    add("--epoch-repeats", type=float, default=0.0)
    add("--start-epoch", type=int, default=None)
    add("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    add("--decay-epochs", type=float, default=90)
    add("--warmup-epochs", type=float, default=5)
    add("--warmup-prefix", type=_bool, default=False)
    add("--cooldown-epochs", type=int, default=0)
    add("--patience-epochs", type=int, default=10)
    add("--decay-rate", type=float, default=0.1)
    # augmentation and regularization
    add("--no-aug", type=_bool, default=False)
    add("--scale", type=float, nargs=2, default=[0.08, 1.0])
    add("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    add("--hflip", type=float, default=0.5)
    add("--vflip", type=float, default=0.0)
    add("--color-jitter", type=_opt_float, default=0.4)
    add("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment)")
    add("--aug-repeats", type=float, default=0, help="repeated augmentation (distributed runs only)")
    add("--aug-splits", type=int, default=0)
    add("--jsd-loss", type=_bool, default=False)
    add("--bce-loss", type=_bool, default=False)
    add("--bce-target-thresh", type=_opt_float, default=None)
    add("--reprob", type=float, default=0.0)
    add("--remode", default="pixel")
    add("--recount", type=int, default=1)
    add("--resplit", type=_bool, default=False)
    add("--mixup", type=float, default=0.0)
    add("--cutmix", type=float, default=0.0)
    add("--cutmix-minmax", type=float, nargs="+", default=None)
    add("--mixup-prob", type=float, default=1.0)
    add("--mixup-switch-prob", type=float, default=0.5)
    add("--mixup-mode", default="batch")
    add("--mixup-off-epoch", type=int, default=0)
    add("--smoothing", type=float, default=0.1)
    add("--train-interpolation", default="random")
    add("--drop", type=float, default=0.0)
    add("--drop-connect", type=_opt_float, default=None)
    add("--drop-path", type=_opt_float, default=None)
    add("--drop-block", type=_opt_float, default=None)
    # batch norm
    add("--bn-momentum", type=_opt_float, default=None)
    add("--bn-eps", type=_opt_float, default=None)
    add("--sync-bn", type=_bool, default=False)
    add("--dist-bn", default="reduce")
    add("--split-bn", type=_bool, default=False)
    # EMA
    add("--model-ema", type=_bool, default=False)
    add("--model-ema-force-cpu", type=_bool, default=False)
    add("--model-ema-decay", type=float, default=0.9998)
    # misc
    add("--seed", type=int, default=42)
    add("--log-interval", type=int, default=50)
    add("--checkpoint-hist", type=int, default=10)
    add("--workers", "-j", type=int, default=4)
    add("--amp", type=_bool, default=False, help="mixed precision: float16 on CUDA, bfloat16 on CPU")
    add("--amp-dtype", default="float16")
    add("--no-prefetcher", type=_bool, default=False)
    add("--pin-mem", type=_bool, default=False)
    add("--output", default="", help="output folder (default ./output/train/<experiment>)")
    add("--experiment", default="")
    add("--eval-metric", default="top1")
    add("--device", default="", help="default: cuda when available, else cpu")
    add("--use-multi-epochs-loader", type=_bool, default=False)
    add("--plot", type=_bool, default=True, help="write summary.png at the end")
    add("--compare-adamw", type=_bool, default=False,
        help="after the run, train the same recipe with AdamW (--adamw-lr / --adamw-weight-decay) "
             "into <output>/adamw and plot both curves")
    add("--adamw-lr", type=float, default=None,
        help="AdamW lr for --compare-adamw; default: this run's lr / 5 (the translation helper's ratio)")
    add("--adamw-weight-decay", type=float, default=0.05)
    return p


# Recipe keys accepted from a YAML but not acted on: bookkeeping of the zoo's
# timm version, or features with no effect here.  Keys whose non-default
# value would change the training are in _MUST_BE_OFF and refused if set.
# A recipe's ``resume`` is the state of one machine, not part of the recipe.
_IGNORED_KEYS = {
    "local_rank", "opt_debug", "configure", "save_images", "recovery_interval", "log_wandb",
    "native_amp", "tta", "resume",
}
_MUST_BE_OFF = {
    "jsd_loss": False, "aug_splits": 0, "split_bn": False, "torchscript": False, "apex_amp": False,
    "drop_connect": None, "epoch_repeats": 0.0, "bn_tf": False, "resplit": False,
}


def load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path!r} is not valid YAML: {err}") from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path!r} must be a mapping of argument names to values, "
                          f"got a {type(cfg).__name__}")
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k not in known and k not in _IGNORED_KEYS and k not in _MUST_BE_OFF)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                 for k in unknown]
        raise ConfigError(f"config {path!r} has unknown keys: {', '.join(hints)}")
    return cfg


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        cfg = load_config(pre.config, parser)
        # Keys the trainer does not act on keep only documentary value; the
        # ones that would change training must be off.
        for key, off in _MUST_BE_OFF.items():
            if key in cfg and cfg[key] != off and not (off in (0, 0.0, None, False) and not cfg[key]):
                raise ConfigError(f"config {pre.config!r}: {key}={cfg[key]!r} is not supported by this "
                                  f"trainer (it must be {off!r}); use --launch with timm's train.py")
        parser.set_defaults(**{k: v for k, v in cfg.items() if k not in _IGNORED_KEYS and k not in _MUST_BE_OFF})
    args = parser.parse_args(argv)
    if args.opt_betas is not None:
        args.opt_betas = [float(b) for b in args.opt_betas]
    return args


# ------------------------------------------------------------------ helpers
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(args, epoch: int) -> int:
    # Every epoch reseeds all RNGs from (seed, epoch, rank), so a resumed run
    # draws the same augmentations and dropout masks as an uninterrupted one.
    return args.seed + 10007 * (epoch + 1) + 101 * args.rank


def plain(value: Any) -> Any:
    """YAML/checkpoint-safe copy: tuples to lists, only builtin types."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def fmt_time(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0, seconds))))


def is_main(args) -> bool:
    return args.rank == 0


def log(args, msg: str) -> None:
    if is_main(args):
        print(msg, flush=True)


def setup_distributed(args) -> torch.device:
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.rank = int(os.environ.get("RANK", 0))
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = args.world_size > 1
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA GPU is available")
    if args.distributed:
        import torch.distributed as dist
        backend = "nccl" if want.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if want.startswith("cuda"):
        device = torch.device("cuda", args.local_rank if args.distributed else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device(want)
    return device


def resolve_data_dir(args) -> str:
    if args.data_dir:
        if not os.path.isdir(args.data_dir):
            raise ConfigError(f"data dir {args.data_dir!r} does not exist (or is not a folder)")
        return args.data_dir
    if args.dataset:
        raise ConfigError(f"--dataset {args.dataset!r} needs --data-dir")
    from adan_plugin.data import write_digits_imagefolder
    size = args.img_size or (args.input_size[-1] if args.input_size else 32)
    if args.distributed:
        import torch.distributed as dist
        root = write_digits_imagefolder(size=size) if is_main(args) else None
        dist.barrier()
        root = write_digits_imagefolder(size=size)
    else:
        root = write_digits_imagefolder(size=size)
    log(args, f"no --data-dir: using the embedded digits ImageFolder at {root}")
    return str(root)


def create_model(args, num_classes: int):
    import timm
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        raise ConfigError(f"unknown model {args.model!r}" + (f"; close names: {', '.join(close)}" if close else
                                                             "; see timm.list_models()"))
    kwargs = dict(pretrained=args.pretrained, num_classes=num_classes, drop_rate=args.drop,
                  drop_path_rate=args.drop_path, drop_block_rate=args.drop_block, global_pool=args.gp,
                  bn_momentum=args.bn_momentum, bn_eps=args.bn_eps)
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    size = args.img_size or (args.input_size[-1] if args.input_size else None)
    if size is not None:
        try:  # models with a fixed-size embedding (ViT) take img_size; CNNs do not
            return timm.create_model(args.model, img_size=size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(args.model, **kwargs)


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} does not exist")
    # weights_only: a checkpoint can hold tensors and plain containers, never code.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors name the offending global
        raise ConfigError(f"checkpoint {path!r} cannot be loaded safely (weights_only=True): {err}") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, not a dict")
    if "state_dict" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return {"state_dict": ckpt}  # a bare model state_dict (e.g. for --initial-checkpoint)
        raise ConfigError(f"checkpoint {path!r} has no 'state_dict'")
    return ckpt


def load_model_state(model, state_dict, path: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {path!r} does not fit model: {str(err).splitlines()[0]}") from None


def read_summary(path: str) -> List[Dict[str, float]]:
    rows = []
    if os.path.isfile(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("epoch") and row["epoch"] != "epoch":
                    rows.append(row)
    return rows


def write_summary(path: str, rows: List[Dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: row[k] for k in SUMMARY_COLUMNS})
    os.replace(tmp, path)


# ------------------------------------------------------------------ training
def make_loss(args, mixup_active: bool):
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_active:
        # mixup/cutmix targets are already smoothed by the mixer
        if args.bce_loss:
            return BinaryCrossEntropy(target_threshold=args.bce_target_thresh)
        return SoftTargetCrossEntropy()
    if args.smoothing:
        if args.bce_loss:
            return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh)
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=args.bce_target_thresh)
    return torch.nn.CrossEntropyLoss()


def amp_context(args, device):
    if not args.amp:
        return nullcontext, None
    dtype = torch.bfloat16 if (device.type == "cpu" or args.amp_dtype == "bfloat16") else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, lr_scheduler, autocast, scaler,
                    model_ema, mixup_fn, clock):
    from timm.utils import dispatch_clip_grad
    model.train()
    accum = max(1, args.grad_accum_steps)
    n_batches = len(loader)
    updates_per_epoch = (n_batches + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    loss_sum = torch.zeros((), device=device)
    seen = 0
    t_epoch = time.time()
    optimizer.zero_grad(set_to_none=True)
    for idx, (inputs, target) in enumerate(loader):
        last = idx == n_batches - 1
        need_update = last or (idx + 1) % accum == 0
        if not args.prefetcher:
            inputs, target = inputs.to(device), target.to(device)
            if mixup_fn is not None:
                inputs, target = mixup_fn(inputs, target)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        sync = nullcontext() if (need_update or not args.distributed) else model.no_sync()
        with sync:
            with autocast():
                loss = loss_fn(model(inputs), target)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if need_update:
            if args.clip_grad is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if model_ema is not None:
                model_ema.update(getattr(model, "module", model), step=num_updates)  # unwrapped from DDP
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
        loss_sum += loss.detach() * inputs.shape[0]
        seen += inputs.shape[0]
        clock["batches_done"] += 1
        if last or (idx + 1) % args.log_interval == 0:
            # checked where the loss is read anyway: no host sync on the other batches
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"loss is {loss.item()} at epoch {epoch} batch {idx}; stopping")
        if is_main(args) and (last or (idx + 1) % args.log_interval == 0):
            elapsed = time.time() - t_epoch
            rate = seen * args.world_size / max(elapsed, 1e-9)
            per_batch = (time.time() - clock["start"]) / clock["batches_done"]
            remaining = clock["total_batches"] - clock["batches_done"]
            lr = optimizer.param_groups[0]["lr"]
            print(f"Train: {epoch} [{idx + 1:>4d}/{n_batches} ({100.0 * (idx + 1) / n_batches:3.0f}%)]  "
                  f"loss {loss.item():.4f} (avg {loss_sum.item() / seen:.4f})  lr {lr:.3e}  "
                  f"{rate:.1f} img/s  ETA epoch {fmt_time(per_batch * (n_batches - idx - 1))} "
                  f"total {fmt_time(per_batch * remaining)}", flush=True)
    avg = loss_sum / max(seen, 1)
    if args.distributed:
        import torch.distributed as dist
        dist.all_reduce(avg)
        avg /= args.world_size
    return avg.item()


@torch.no_grad()
def validate(model, loader, args, device, autocast, num_classes):
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    k = min(5, num_classes)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    for inputs, target in loader:
        if not args.prefetcher:
            inputs, target = inputs.to(device), target.to(device)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(inputs)
        output = output.float()
        hits = output.topk(k, dim=1).indices.eq(target[:, None])
        stats += torch.stack([loss_fn(output, target).double(), hits[:, 0].sum().double(),
                              hits.any(dim=1).sum().double(),
                              torch.tensor(float(target.shape[0]), device=device, dtype=torch.float64)])
    if args.distributed:
        import torch.distributed as dist
        dist.all_reduce(stats)
    loss, h1, h5, n = stats.tolist()
    return {"eval_loss": loss / n, "eval_top1": 100.0 * h1 / n, "eval_top5": 100.0 * h5 / n}


def output_dir_for(args) -> str:
    if args.output:
        out = os.path.join(args.output, args.experiment) if args.experiment else args.output
    else:
        name = args.experiment or "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), args.model])
        out = os.path.join("output", "train", name)
    return out


def train(args) -> Dict[str, Any]:
    """Run the recipe in ``args``; returns the final and best metrics."""
    import timm
    from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, distribute_bn

    device = setup_distributed(args)
    adan_plugin.integrations.timm.fix_randaugment_posterize()
    if args.lr is None:
        raise ConfigError("no learning rate: give --lr or a --config that sets lr")
    if args.grad_accum_steps < 1:
        raise ConfigError(f"--grad-accum-steps must be >= 1, got {args.grad_accum_steps}")
    if args.aug_repeats and not args.distributed:
        log(args, f"note: aug_repeats={args.aug_repeats} needs a distributed run (timm's RepeatAugSampler); "
                  "it is off for this single-process run")
        args.aug_repeats = 0
    seed_all(args.seed + args.rank)
    data_dir = resolve_data_dir(args)

    # datasets first: an ImageFolder tells the number of classes
    class_map = args.class_map or ""
    dataset_train = create_dataset(args.dataset, root=data_dir, split=args.train_split, is_training=True,
                                   class_map=class_map, batch_size=args.batch_size, seed=args.seed)
    dataset_eval = create_dataset(args.dataset, root=data_dir, split=args.val_split, is_training=False,
                                  class_map=class_map, batch_size=args.batch_size)
    num_classes = args.num_classes
    if num_classes is None:
        reader = getattr(dataset_train, "reader", None)
        num_classes = len(getattr(reader, "class_to_idx", {}) or {}) or 1000
    args.num_classes = num_classes

    model = create_model(args, num_classes)
    if args.initial_checkpoint:
        load_model_state(model, load_checkpoint(args.initial_checkpoint)["state_dict"], args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm); drop it for CPU runs")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    optimizer = adan_plugin.integrations.timm.create_optimizer(model, args)
    autocast, scaler = amp_context(args, device)

    start_epoch, best = 0, None
    output_dir = output_dir_for(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        if ckpt.get("arch") not in (None, args.model):
            raise ConfigError(f"checkpoint {args.resume!r} is of model {ckpt['arch']!r}, not {args.model!r}")
        load_model_state(model, ckpt["state_dict"], args.resume)
        if not args.no_resume_opt and "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"]) + 1
        best = ckpt.get("best")
        log(args, f"resumed from {args.resume} (epoch {ckpt['epoch']}); continuing at epoch {start_epoch}")
    if args.start_epoch is not None:
        start_epoch = args.start_epoch

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
        if ckpt is not None and ckpt.get("state_dict_ema") is not None:
            model_ema.module.load_state_dict(ckpt["state_dict_ema"])

    train_model = model
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    # loaders, mixup
    args.prefetcher = not args.no_prefetcher
    mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    mixup_fn, collate_fn = None, None
    if mixup_active:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
    loader_common = dict(mean=data_config["mean"], std=data_config["std"], num_workers=args.workers,
                         distributed=args.distributed, pin_memory=args.pin_mem, device=device,
                         use_prefetcher=args.prefetcher, persistent_workers=False)
    loader_train = create_loader(
        dataset_train, input_size=data_config["input_size"], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_split=args.resplit, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        interpolation=train_interpolation, collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader, **loader_common)
    loader_eval = create_loader(
        dataset_eval, input_size=data_config["input_size"], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
        **loader_common)

    loss_fn = make_loss(args, mixup_active).to(device)
    accum = max(1, args.grad_accum_steps)
    updates_per_epoch = (len(loader_train) + accum - 1) // accum
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs,
        patience_epochs=args.patience_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
        noise=args.lr_noise, noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
        cycle_mul=args.lr_cycle_mul, cycle_decay=args.lr_cycle_decay, cycle_limit=args.lr_cycle_limit,
        k_decay=args.lr_k_decay, step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    rows: List[Dict[str, Any]] = []
    if is_main(args):
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "args.yaml"), "w") as f:
            yaml.safe_dump(plain({k: v for k, v in vars(args).items() if k not in ("prefetcher",)}), f,
                           sort_keys=True)
        # a resumed run keeps the rows before its start and rewrites the rest
        rows = [r for r in read_summary(os.path.join(output_dir, "summary.csv")) if int(r["epoch"]) < start_epoch]
    log(args, f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
              f"optimizer {type(optimizer).__name__} ({args.opt}), {num_epochs} epochs "
              f"({args.epochs} + {args.cooldown_epochs} cooldown), global batch "
              f"{args.batch_size * args.world_size * accum}, {len(dataset_train)} train / {len(dataset_eval)} val "
              f"images, device {device}, output {output_dir}")

    clock = {"start": time.time(), "batches_done": 0,
             "total_batches": len(loader_train) * max(0, num_epochs - start_epoch)}
    metrics: Dict[str, float] = {}
    eval_metric = "eval_" + args.eval_metric if not args.eval_metric.startswith("eval_") else args.eval_metric
    for epoch in range(start_epoch, num_epochs):
        seed_all(epoch_seed(args, epoch))
        if args.distributed and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        if args.prefetcher and args.mixup_off_epoch and epoch >= args.mixup_off_epoch and collate_fn is not None:
            collate_fn.mixup_enabled = False
        elif mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(epoch, train_model, loader_train, optimizer, loss_fn, args, device,
                                     lr_scheduler, autocast, scaler, model_ema, mixup_fn, clock)
        if args.distributed and args.dist_bn in ("broadcast", "reduce"):
            distribute_bn(model, args.world_size, args.dist_bn == "reduce")
        metrics = validate(model, loader_eval, args, device, autocast, num_classes)
        if model_ema is not None and not args.model_ema_force_cpu:
            # like the zoo's timm train.py: with EMA on, the EMA weights are the ones logged
            if args.distributed and args.dist_bn in ("broadcast", "reduce"):
                distribute_bn(model_ema, args.world_size, args.dist_bn == "reduce")
            metrics = validate(model_ema.module, loader_eval, args, device, autocast, num_classes)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, metrics[eval_metric])
        row = {"epoch": epoch, "train_loss": train_loss, **metrics, "lr": lr}
        if is_main(args):
            rows.append(row)
            write_summary(os.path.join(output_dir, "summary.csv"), rows)
            improved = best is None or metrics[eval_metric] > best["value"]
            if improved:
                best = {"value": metrics[eval_metric], "epoch": epoch}
            state = {"version": CHECKPOINT_VERSION, "epoch": epoch, "arch": args.model,
                     "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "metric": metrics[eval_metric], "best": best, "args": plain(vars(args))}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if model_ema is not None:
                state["state_dict_ema"] = model_ema.module.state_dict()
            save_checkpoint(os.path.join(output_dir, "last.pth.tar"), state)
            if improved:
                save_checkpoint(os.path.join(output_dir, "model_best.pth.tar"), state)
            if args.checkpoint_hist > 0:
                save_checkpoint(os.path.join(output_dir, f"checkpoint-{epoch}.pth.tar"), state)
                stale = os.path.join(output_dir, f"checkpoint-{epoch - args.checkpoint_hist}.pth.tar")
                if os.path.exists(stale):
                    os.remove(stale)
            print(f"Epoch {epoch}: train_loss {train_loss:.4f}  eval_loss {metrics['eval_loss']:.4f}  "
                  f"top1 {metrics['eval_top1']:.2f}%  top5 {metrics['eval_top5']:.2f}%  lr {lr:.3e}  "
                  f"elapsed {fmt_time(time.time() - clock['start'])}", flush=True)

    if args.distributed:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    result = {"output_dir": output_dir, "final_top1": metrics.get("eval_top1"),
              "best_top1": best["value"] if best else None, "best_epoch": best["epoch"] if best else None}
    if is_main(args) and metrics:
        print(f"final top-1: {metrics['eval_top1']:.2f}%  (best {best['value']:.2f}% at epoch {best['epoch']})  "
              f"-> {output_dir}/summary.csv", flush=True)
    return result


def plot_runs(out_png: str, runs: Dict[str, str]) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compare_zoo
    curves = {label: compare_zoo.read_summary(path) for label, path in runs.items()}
    compare_zoo.plot_curves(curves, out_png, title=" vs ".join(runs))
    print(f"plot: {out_png}", flush=True)


# ------------------------------------------------------------------ launcher
_ADAN_FLAGS = {"--max-grad-norm": "max_grad_norm", "--max_grad_norm": "max_grad_norm",
               "--no-prox": "no_prox", "--no_prox": "no_prox",
               "--bias-decay": "bias_decay", "--bias_decay": "bias_decay"}


def split_launch_args(argv: Sequence[str]):
    """(script, argv for the script, Adan keys) from our argv in --launch mode."""
    argv = list(argv)
    i = argv.index("--launch")
    if i + 1 >= len(argv):
        raise ConfigError("--launch needs the path of a timm train.py")
    script, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    adan: Dict[str, Any] = {}
    for j, arg in enumerate(rest):  # the recipe YAML first, the command line wins
        if arg in ("-c", "--config") and j + 1 < len(rest):
            cfg = load_config(rest[j + 1], build_parser())
            adan.update({k: cfg[k] for k in ("max_grad_norm", "no_prox", "bias_decay") if k in cfg})
    out, j = [], 0
    while j < len(rest):
        key = _ADAN_FLAGS.get(rest[j].split("=", 1)[0])
        if key is None:
            out.append(rest[j])
            j += 1
            continue
        if "=" in rest[j]:
            value, j = rest[j].split("=", 1)[1], j + 1
        elif key != "max_grad_norm" and (j + 1 >= len(rest) or rest[j + 1].startswith("-")):
            value, j = "true", j + 1
        else:
            if j + 1 >= len(rest):
                raise ConfigError(f"{rest[j]} needs a value")
            value, j = rest[j + 1], j + 2
        adan[key] = float(value) if key == "max_grad_norm" else _bool(value)
    return script, out, adan


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--launch" in argv:
        script, rest, adan = split_launch_args(argv)
        if not os.path.isfile(script):
            raise ConfigError(f"--launch: no training script at {script!r}")
        adan_plugin.integrations.timm.launch_upstream_train(script, rest, adan)
        return {}
    args = parse_args(argv)
    result = train(args)
    out = result["output_dir"]
    if args.compare_adamw and args.rank == 0 and not args.distributed:
        adamw = parse_args(argv)
        adamw.opt = "adamw"
        # default: the translation helper's rule (Adan lr = 5 x AdamW lr) run backwards
        adamw.lr = args.adamw_lr if args.adamw_lr is not None else args.lr / SCRATCH_LR_SCALE
        adamw.weight_decay = args.adamw_weight_decay
        adamw.max_grad_norm, adamw.no_prox, adamw.opt_kwargs = 0.0, False, {}
        adamw.output, adamw.experiment, adamw.resume = os.path.join(out, "adamw"), "", ""
        print(f"\n=== same recipe with AdamW (lr {adamw.lr:g}, weight decay {adamw.weight_decay:g}) ===", flush=True)
        result["adamw"] = train(adamw)
        if args.plot:
            plot_runs(os.path.join(out, "adan_vs_adamw.png"),
                      {f"Adan (lr {args.lr:g})": os.path.join(out, "summary.csv"),
                       f"AdamW (lr {adamw.lr:g})": os.path.join(out, "adamw", "summary.csv")})
        print(f"final top-1: Adan {result['final_top1']:.2f}%  AdamW {result['adamw']['final_top1']:.2f}%",
              flush=True)
    elif args.plot and args.rank == 0 and result.get("final_top1") is not None:
        plot_runs(os.path.join(out, "summary.png"), {args.opt: os.path.join(out, "summary.csv")})
    return result


if __name__ == "__main__":
    main()
