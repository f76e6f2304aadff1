"""Train a timm model with Adan from a zoo recipe (configs/timm/*.yaml) -- or launch timm's train.py.

    python tools/train_timm.py --config configs/timm/vit-s_150-I.yaml --data-dir /data/imagenet
    torchrun --nproc-per-node 8 tools/train_timm.py --config configs/timm/res50_100.yaml --data-dir ...
    python tools/train_timm.py --config configs/timm/demo/digits_test_resnet.yaml   # embedded digits, CPU
    python tools/train_timm.py --launch /path/to/timm/train.py --config configs/timm/res50_100.yaml ...

The recipe YAMLs use timm train.py's argument names (the zoo's ``args_*.yaml``
load unchanged); every key can be overridden on the command line
(``--lr 0.01``, ``--opt-betas 0.98 0.92 0.99``, ``--max-grad-norm 5``,
``--no-prox false``, ``--bias-decay true``).  Without ``--data-dir`` the
embedded dataset is used: scikit-learn's digits written once as an
ImageFolder in the cache folder.

Less optimizer memory: ``--opt-kwargs state_dtype=8bit`` or ``state_dtype=bfloat16``.  Pure-bf16
training (bf16 parameters, no autocast): ``--model-dtype bfloat16 --opt-kwargs kahan_sum=True``.

The output folder holds ``args.yaml``, ``summary.csv`` (epoch, train_loss,
eval_loss, eval_top1, eval_top5, lr), ``summary.png`` and checkpoints
(``last.pth.tar``, ``model_best.pth.tar``, ``checkpoint-<epoch>.pth.tar``)
that load with ``torch.load(weights_only=True)``.  ``--resume <checkpoint>``
continues a run, epoch numbering, schedule and RNG streams included; the
optimizer's hyper-parameters (betas, weight decay, max_grad_norm, no_prox, ...)
are the checkpoint's: one the command line sets otherwise is named in a
warning, and ``args.yaml`` records the checkpoint's value.

``--compare-adamw`` then trains the same recipe with AdamW into
``<output>/adamw``: lr ``--adamw-lr`` (default: this run's / 5), weight decay
``--adamw-weight-decay``, betas ``--adamw-betas`` (default: AdamW's own
(0.9, 0.999), not the recipe's Adan betas), without Adan's keys
(``max_grad_norm``, ``no_prox``, ``opt_kwargs``).

``--launch PATH`` runs an upstream timm ``train.py`` unmodified instead, with
adan_plugin registered (``--opt adan`` is our Adan) and the Adan keys
(``max_grad_norm``, ``no_prox``, ``bias_decay``, from ``--config`` or the
command line) passed to the optimizer through ``--opt-kwargs``, together with
the recipe's ``opt_kwargs`` and every ``--opt-kwargs`` of the command line
(merged, the command line's last; timm's train.py alone keeps only the last
occurrence).

Every recipe key and option is either used, or listed here as having no effect
(a warning names those a recipe sets), or refused with an error naming it when
set to a value that would change training (``jsd_loss``, ``aug_splits``,
``split_bn``, ``drop_connect``, ``epoch_repeats``, ``tta``, ...): use
``--launch`` with timm's train.py for those.  A recipe value of the wrong type
(``epochs: 1.5``) is an error naming the key.  ``--resume`` refuses a checkpoint
without optimizer state unless ``--allow-fresh-optimizer-state`` is given.
User errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Any, Dict, Optional, Sequence

import yaml

from timm_train.opt_kwargs import OptKwargs


class ConfigError(SystemExit):
    """A user error: exit status 2; the entry point prints the message, no traceback."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = f"train_timm.py: error: {message}"

    def __str__(self) -> str:
        return self.message


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
    add("--no-resume-opt", type=_bool, default=False, help="resume the model only; the optimizer starts afresh")
    add("--allow-fresh-optimizer-state", type=_bool, default=False,
        help="resume from a checkpoint without optimizer state (its moments restart from zero) with a "
             "warning instead of an error")
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
    add("--no-prox", type=_bool, default=None,
        help="Adan: decoupled instead of proximal weight decay; default: the --opt name's (adanw, cadanw, "
             "fusedadanw, adanw8bit: decoupled)")
    add("--bias-decay", type=_bool, default=False,
        help="weight decay on every parameter, 1-d ones (biases, norms) included")
    add("--opt-kwargs", nargs="*", default={}, action=OptKwargs,
        help="extra optimizer arguments k=v; less memory: state_dtype=8bit, state_dtype=bfloat16, kahan_sum=True")
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
    add("--model-dtype", default=None, choices=["float32", "bfloat16", "float16"],
        help="the parameters' own dtype (no autocast; not with --amp): bfloat16 for pure-bf16 training, "
             "with --opt-kwargs kahan_sum=True so that updates below half a bf16 step are not lost")
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
    add("--adamw-betas", type=float, nargs=2, default=None,
        help="AdamW betas for --compare-adamw; default: AdamW's own (0.9, 0.999), not the recipe's Adan betas")
    return p


# Recipe keys and options the trainer does not act on.  _NO_EFFECT: no value of theirs
# changes the training (bookkeeping of the zoo's timm version); a recipe that sets one
# gets a warning naming it.  _REFUSED: features this trainer does not implement; their
# "off" value is accepted (with the warning), any other value is an error naming the key,
# from a recipe or the command line.  native_amp (timm < 0.6: native AMP) works: it
# turns --amp on.  A recipe's ``resume`` is the state of one machine, not part of the
# recipe: it is not applied (use --resume); nor is local_rank.
_NO_EFFECT = {
    "opt_debug": "timm's optimizer debug output",
    "configure": "not a timm training option",
    "save_images": "debug images of the first batch",
    "recovery_interval": "timm's mid-epoch recovery checkpoints",
    "log_wandb": "Weights & Biases logging",
}
# The state of one machine, recorded in the zoo's args files: never taken from a recipe (warned).
_NOT_FROM_RECIPE = {
    "local_rank": "set by the launcher (torchrun's LOCAL_RANK)",
    "resume": "pass --resume",
}
_REFUSED = {
    "jsd_loss": False, "aug_splits": 0, "split_bn": False, "torchscript": False, "apex_amp": False,
    "drop_connect": None, "epoch_repeats": 0.0, "bn_tf": False, "tta": 0,
}
_RECIPE_ALIASES = {"native_amp": "amp"}


def _is_off(value: Any, off: Any) -> bool:
    return value == off or (off in (0, 0.0, None, False) and not value)


def _expected(action: argparse.Action) -> str:
    kind = {int: "an integer", float: "a number", _bool: "true or false", _opt_float: "a number or null",
            None: "a string"}.get(action.type, getattr(action.type, "__name__", "a value"))
    if action.nargs in ("+", "*"):
        return f"a list of values, each {kind}"
    if isinstance(action.nargs, int):
        return f"a list of {action.nargs} values, each {kind}"
    return kind


def _convert_one(action: argparse.Action, value: Any) -> Any:
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        return int(value)
    if kind in (float, _opt_float):
        if value is None and kind is _opt_float:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        return kind(value) if isinstance(value, str) else float(value)
    if kind is _bool:
        if not isinstance(value, (bool, int, str)):
            raise ValueError
        return _bool(value)
    if kind is None:
        if not isinstance(value, str):
            raise ValueError
        return value
    return kind(value)


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A recipe value checked (and converted) the way the command line would parse it."""
    if value is None and (action.default is None or action.type is _opt_float):
        return None
    if value is None and action.type is None:  # a string option left empty (the zoo's ``experiment: null``)
        return action.default
    if action.dest == "opt_kwargs":
        if not isinstance(value, dict):
            raise ConfigError(f"config {path!r}: {key}: expected a mapping of optimizer arguments, got {value!r}")
        return value
    try:
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            if not isinstance(value, (list, tuple)):
                raise ValueError
            if (isinstance(action.nargs, int) and len(value) != action.nargs) or (action.nargs == "+" and not value):
                raise ValueError
            return [_convert_one(action, v) for v in value]
        converted = _convert_one(action, value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"config {path!r}: {key}: expected {_expected(action)}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:  # argparse checks the command line only
        raise ConfigError(f"config {path!r}: {key}: expected one of {', '.join(map(repr, action.choices))}, "
                          f"got {value!r}")
    return converted


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
    actions = {a.dest: a for a in parser._actions}
    known = set(actions)
    tables = set(_NO_EFFECT) | set(_NOT_FROM_RECIPE) | set(_REFUSED) | set(_RECIPE_ALIASES)
    unknown = sorted(str(k) for k in cfg if k not in known and k not in tables)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known | tables, 1)) else k
                 for k in unknown]
        raise ConfigError(f"config {path!r} has unknown keys: {', '.join(hints)}")
    for key in list(cfg):
        if key in actions and key not in tables and actions[key].option_strings:
            cfg[key] = _convert(actions[key], key, cfg[key], path)
    return cfg


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"train_timm.py: warning: {message}", file=sys.stderr, flush=True)


def check_unsupported(args: argparse.Namespace, cfg: Dict[str, Any], config: str) -> None:
    """Refuse every feature this trainer does not implement, set in the recipe or on the command line."""
    for key, off in _REFUSED.items():
        for value, source in ((cfg.get(key, off), f"config {config!r}"), (getattr(args, key, off), "command line")):
            if not _is_off(value, off):
                raise ConfigError(f"{key}={value!r} ({source}) is not supported by this trainer (it must be "
                                  f"{off!r}); use --launch with timm's train.py")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    cfg: Dict[str, Any] = {}
    if pre.config:
        cfg = load_config(pre.config, parser)
        if cfg.get("native_amp"):
            cfg["amp"] = True
        parser.set_defaults(**{k: v for k, v in cfg.items() if k not in _NO_EFFECT and k not in _REFUSED
                               and k not in _RECIPE_ALIASES and k not in _NOT_FROM_RECIPE})
    args = parser.parse_args(argv)
    if args.opt_betas is not None:
        args.opt_betas = [float(b) for b in args.opt_betas]
    check_unsupported(args, cfg, pre.config)
    if args.amp and args.model_dtype not in (None, "float32"):
        raise ConfigError(f"--model-dtype {args.model_dtype} trains the parameters themselves in {args.model_dtype}; "
                          "--amp autocasts float32 parameters: use one or the other")
    unused = [f"{k}={cfg[k]!r}" for k in sorted(cfg) if k in _NO_EFFECT or k in _REFUSED or k in _NOT_FROM_RECIPE]
    if unused:
        _warn(f"config {pre.config!r}: keys this trainer does not use, at values that cannot change the "
              f"results: {', '.join(unused)}")
    return args
