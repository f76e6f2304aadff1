"""Checkpoint I/O: atomic save, and a load that accepts tensors and plain containers only (weights_only).

A resumed optimizer takes its hyper-parameters from the checkpoint: the helpers at the end find
those that differ from the command line's, for the warning and the recorded args.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from adan_plugin import checkpoint as adan_checkpoint
from timm_train.config import ConfigError

CHECKPOINT_VERSION = 1


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Atomic: ``path`` is the complete new checkpoint or stays as it was; no temporary file is left."""
    adan_checkpoint.save_checkpoint(state, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    # weights_only: a checkpoint can hold tensors and plain containers, never code.
    try:
        ckpt = adan_checkpoint.load_checkpoint(path, map_location="cpu")
    except (adan_checkpoint.CheckpointError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, not a dict")
    if "state_dict" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return {"state_dict": ckpt}  # a bare model state_dict (e.g. for --initial-checkpoint)
        raise ConfigError(f"checkpoint {path!r} has no 'state_dict'")
    if not isinstance(ckpt["state_dict"], dict):
        raise ConfigError(f"checkpoint {path!r}: 'state_dict' is a {type(ckpt['state_dict']).__name__}, not a dict")
    return ckpt


def check_resume(ckpt: Dict[str, Any], path: str, args) -> int:
    """Everything --resume needs from ``ckpt``, checked before anything is loaded; the epoch it ended."""
    if ckpt.get("arch") not in (None, args.model):
        raise ConfigError(f"checkpoint {path!r} is of model {ckpt['arch']!r}, not {args.model!r}")
    if "epoch" not in ckpt:
        raise ConfigError(f"checkpoint {path!r} has no 'epoch': it is not a training checkpoint of this "
                          f"trainer (a model's weights go to --initial-checkpoint)")
    epoch = ckpt["epoch"]
    if isinstance(epoch, torch.Tensor) and epoch.numel() == 1 and not epoch.is_floating_point():
        epoch = int(epoch)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ConfigError(f"checkpoint {path!r}: 'epoch' must be a non-negative integer, got {epoch!r}")
    if not args.no_resume_opt:
        problem = adan_checkpoint.missing_optimizer_state(ckpt)
        if problem is not None and not args.allow_fresh_optimizer_state:
            raise ConfigError(f"checkpoint {path!r}: {problem}; resuming would restart the optimizer's "
                              f"moments from zero (--allow-fresh-optimizer-state to do that on purpose, "
                              f"--no-resume-opt to resume the model only)")
        if problem is None and not isinstance(ckpt["optimizer"].get("param_groups"), list):
            raise ConfigError(f"checkpoint {path!r}: its optimizer state has no 'param_groups' list")
    return epoch


def load_model_state(model, state_dict, path: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {path!r} does not fit model: {str(err).splitlines()[0]}") from None


# param_groups keys that are not the command line's to set on a resume: the schedule
# drives the lr (and timm's scheduler keeps initial_lr there), the optimizer counts steps.
_NOT_HYPERPARAMETERS = ("params", "lr", "initial_lr", "step")
# the option a hyper-parameter comes from; any other key is an --opt-kwargs one
_OPTION = {"weight_decay": "--weight-decay", "betas": "--opt-betas", "eps": "--opt-eps",
           "max_grad_norm": "--max-grad-norm", "no_prox": "--no-prox / --opt adanw", "momentum": "--momentum",
           "lr_scale": "--layer-decay"}
# derived from an option rather than one (lr_scale: --layer-decay's per-layer factor): named, not recorded
_DERIVED = ("lr_scale",)


def hyperparameters(optimizer) -> List[Dict[str, Any]]:
    """The hyper-parameters of each of ``optimizer``'s param groups."""
    return [{k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS} for group in optimizer.param_groups]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        try:
            return torch.equal(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
        except (TypeError, ValueError, RuntimeError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def overridden_by_checkpoint(asked: List[Dict[str, Any]], loaded: List[Dict[str, Any]]) -> List[Tuple[str, Any, Any]]:
    """(key, checkpoint's value, command line's value) for each hyper-parameter loading the checkpoint changed.

    ``asked``: :func:`hyperparameters` of the optimizer built from the command line, before
    ``load_state_dict``; ``loaded``: after it.  A key either side lacks is not compared.
    """
    found: List[Tuple[str, Any, Any]] = []
    for before, after in zip(asked, loaded):
        for key, value in before.items():
            if key not in after or _same(after[key], value):
                continue
            # groups often share a value (weight decay): each change is named once
            if not any(k == key and _same(c, after[key]) and _same(v, value) for k, c, v in found):
                found.append((key, after[key], value))
    return found


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def describe_overrides(overridden: List[Tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key} ({_OPTION.get(key, '--opt-kwargs ' + key)}): checkpoint {_show(ckpt)} is used, "
                     f"not the command line's {_show(asked)}" for key, ckpt, asked in overridden)


def record_overrides(args, overridden: List[Tuple[str, Any, Any]]) -> None:
    """Put the checkpoint's values into ``args`` where the command line's did not run."""
    options = {"betas": "opt_betas", "eps": "opt_eps", "max_grad_norm": "max_grad_norm", "no_prox": "no_prox",
               "momentum": "momentum"}
    for key, ckpt, asked in overridden:
        if isinstance(ckpt, torch.Tensor):
            ckpt = ckpt.item() if ckpt.numel() == 1 else ckpt.tolist()
        if key == "weight_decay":
            # per group: the decayed groups hold --weight-decay, the exempt ones 0 (on both sides)
            if _same(asked, args.weight_decay):
                args.weight_decay = ckpt
        elif key == "betas":
            args.opt_betas = list(ckpt)
        elif key in options:
            setattr(args, options[key], ckpt)
        elif key not in _DERIVED:
            args.opt_kwargs = {**(args.opt_kwargs or {}), key: ckpt}


# execution choices the optimizer keeps over a checkpoint's (Adan.load_state_dict converts the states)
_STATE_FORMAT = {"state_dtype": "the states are converted on loading, 8-bit to float or back",
                 "kahan_sum": "the Kahan buffers of 16-bit parameters are made or dropped on loading"}


def state_format_changes(saved_groups: Any, groups: List[Dict[str, Any]]) -> str:
    """What the optimizer keeps differently from the checkpoint's (``state_dtype``, ``kahan_sum``), in words;
    empty when nothing differs.  Those are this run's choices, not the checkpoint's: a resume without
    ``--opt-kwargs state_dtype=8bit`` turns 8-bit states into float ones (4x the memory)."""
    if not isinstance(saved_groups, list):
        return ""
    changes = []
    for key, effect in _STATE_FORMAT.items():
        pairs = {(repr(saved.get(key)), repr(group.get(key))) for saved, group in zip(saved_groups, groups)
                 if isinstance(saved, dict) and key in saved and key in group and saved[key] != group[key]}
        for was, now in sorted(pairs):
            changes.append(f"{key}={was} in the checkpoint, {now} in this run ({effect}; --opt-kwargs "
                           f"{key}=... keeps the checkpoint's)")
    return "; ".join(changes)

