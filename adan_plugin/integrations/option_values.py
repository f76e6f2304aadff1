"""Adan options written as text, read as Python values: shared by the trainer integrations.

A config file or a command line cannot hold ``torch.bfloat16``: mmengine
configs and timm's ``--opt-kwargs`` (or a recipe's ``opt_kwargs``) write the
state dtype by name, and both integrations read it here, so one spelling
works in every trainer.
"""
from __future__ import annotations

from typing import Any

import torch


def dtype_from_config(name: str, value: Any) -> Any:
    """``'bfloat16'`` / ``'torch.bfloat16'`` -> ``torch.bfloat16``; other values unchanged."""
    if not isinstance(value, str) or value == "8bit":  # "8bit": Adan's 8-bit block-wise states
        return value
    dtype = getattr(torch, value[len("torch."):] if value.startswith("torch.") else value, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name}={value!r} is neither '8bit' (8-bit block-wise states) nor a torch dtype name "
                         "(e.g. 'bfloat16', 'float32')")
    return dtype
