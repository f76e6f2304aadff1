"""Optimizer options as an mmengine config writes them.

A config is text: it cannot hold ``torch.bfloat16``, and a misspelt option
only shows up as ``__init__() got an unexpected keyword argument``.  This
module turns Adan's options from config values into Python values
(``state_dtype='bfloat16'`` -> ``torch.bfloat16``) and names an unknown option
together with the closest known one.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Dict, Mapping

import torch

from ..adan import Adan

# Keys of an optimizer config that are not optimizer options.
_CONFIG_KEYS = ("type", "_scope_", "params")


def check_optimizer_kwargs(optimizer_class: type, options: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming an option ``optimizer_class`` does not take, with the closest match."""
    params = inspect.signature(optimizer_class.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [name for name in params if name not in ("self", "params")]
    for key in options:
        if key in _CONFIG_KEYS or key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{optimizer_class.__name__}: unknown option {key!r}{hint}; "
                        f"its options are {', '.join(known)}")


def dtype_from_config(name: str, value: Any) -> Any:
    """``'bfloat16'`` / ``'torch.bfloat16'`` -> ``torch.bfloat16``; other values unchanged."""
    if not isinstance(value, str) or value == "8bit":  # "8bit": Adan's 8-bit block-wise states
        return value
    dtype = getattr(torch, value[len("torch."):] if value.startswith("torch.") else value, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name}={value!r} is neither '8bit' (8-bit block-wise states) nor a torch dtype name "
                         "(e.g. 'bfloat16', 'float32')")
    return dtype


def optimizer_options_from_config(optimizer_class: type, options: Mapping[str, Any]) -> Dict[str, Any]:
    """``options`` checked against ``optimizer_class`` and, for Adan, with config strings converted."""
    check_optimizer_kwargs(optimizer_class, options)
    options = dict(options)
    if issubclass(optimizer_class, Adan) and "state_dtype" in options:
        options["state_dtype"] = dtype_from_config("state_dtype", options["state_dtype"])
    return options
