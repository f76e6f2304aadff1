"""Checkpoint I/O: atomic save, and a load that accepts tensors and plain containers only (weights_only)."""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from timm_train.config import ConfigError

CHECKPOINT_VERSION = 1


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
