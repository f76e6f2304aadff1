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
from typing import Any, Dict, List, Mapping, Optional

from ..adan import Adan
from .option_values import dtype_from_config  # noqa: F401  (also importable from here, as before)

# Keys of an optimizer config that are not optimizer options.
_CONFIG_KEYS = ("type", "_scope_", "params")


def _known_options(optimizer_class: type) -> Optional[List[str]]:
    """The keyword options ``optimizer_class`` takes, or ``None`` when it takes any keyword.

    A subclass of Adan whose ``__init__`` takes ``**kwargs`` (``FusedAdan``)
    hands them on to Adan's, so its options are its own named ones plus those
    of the classes above it, up to Adan.
    """
    known: List[str] = []
    for cls in optimizer_class.__mro__:
        params = inspect.signature(cls.__init__).parameters
        known += [name for name, p in params.items() if name not in ("self", "params") and name not in known
                  and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return known
        if cls is Adan or not issubclass(cls, Adan):
            return None
    return None


def check_optimizer_kwargs(optimizer_class: type, options: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming an option ``optimizer_class`` does not take, with the closest match."""
    known = _known_options(optimizer_class)
    if known is None:
        return
    for key in options:
        if key in _CONFIG_KEYS or key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{optimizer_class.__name__}: unknown option {key!r}{hint}; "
                        f"its options are {', '.join(known)}")


def optimizer_options_from_config(optimizer_class: type, options: Mapping[str, Any]) -> Dict[str, Any]:
    """``options`` checked against ``optimizer_class`` and, for Adan, with config strings converted."""
    check_optimizer_kwargs(optimizer_class, options)
    options = dict(options)
    if issubclass(optimizer_class, Adan) and "state_dtype" in options:
        options["state_dtype"] = dtype_from_config("state_dtype", options["state_dtype"])
    return options
