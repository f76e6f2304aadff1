"""Checkpoint I/O: atomic save, and a load that accepts tensors and plain containers only (weights_only)."""
from __future__ import annotations

from typing import Any, Dict

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
