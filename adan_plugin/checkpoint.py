"""Moving Adan optimizer checkpoints between implementations.

The official Adan, timm's and ours keep ``neg_pre_grad`` (minus the previous
gradient); mmpretrain's keeps ``pre_grad`` (the gradient itself).  Our
``Adan.load_state_dict`` reads either; this module writes the one another
implementation expects.

It also holds the project's checkpoint file I/O: :func:`load_checkpoint` (a
``weights_only`` load whose errors name the file and the reason),
:func:`save_checkpoint` (atomic) and :func:`missing_optimizer_state`.

8-bit states (``state_dtype="8bit"``: int8/uint8 codes plus ``<key>_scale``
tensors, see :mod:`adan_plugin.lowmem`) are ours alone: for every other
target they are dequantized to float32 and the scales dropped.  Our own
``Adan.load_state_dict`` converts by itself in both directions (8-bit into
float states and float into 8-bit), so ``target='adan_plugin'`` keeps them.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import tempfile
from typing import Any, Dict, Optional, Sequence, Union

import torch

from . import lowmem

TARGETS = ("adan_plugin", "official", "timm", "mmpretrain")


def convert_state_dict(state_dict: Dict[str, Any], target: str) -> Dict[str, Any]:
    """Return a copy of an Adan ``state_dict`` in ``target``'s layout.

    ``target='mmpretrain'`` adds ``pre_grad`` next to ``neg_pre_grad`` (so
    the result still loads everywhere); the other targets share our layout
    and get ``neg_pre_grad`` back from a mmpretrain checkpoint.
    """
    if target not in TARGETS:
        raise ValueError(f"convert_state_dict: unknown target {target!r}; expected one of {TARGETS}")
    out = {"state": {}, "param_groups": copy.deepcopy(state_dict["param_groups"])}
    for index, st in state_dict["state"].items():
        st = dict(lowmem.loaded_form(st, f"convert_state_dict: the state of parameter {index!r}"))
        if target != "adan_plugin":
            st = lowmem.dequantize_state(st)
        if "neg_pre_grad" not in st and "pre_grad" in st:
            st["neg_pre_grad"] = st["pre_grad"].neg()
        if target == "mmpretrain":
            if "neg_pre_grad" in st:
                st["pre_grad"] = st["neg_pre_grad"].neg()
        else:
            st.pop("pre_grad", None)
        out["state"][index] = lowmem.saved_form(st)
    return out


# --------------------------------------------------------------------------- loading and saving files
#
# Trust model: a checkpoint is data.  Every loader of the project reads tensors, plain
# containers and numbers only (torch.load(weights_only=True), or DCP's metadata through
# an allow-list), so a checkpoint file can make a load fail but never run code.


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file and says why."""


_REFUSAL_WORDS = ("GLOBAL", "Unsupported global", "Unsupported class", "safe_globals", "blocked")


def _first_reason(err: BaseException) -> str:
    """The line of a torch.load error that says what was wrong (its full text is a tutorial)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if any(word in line for word in _REFUSAL_WORDS) and not line.startswith(("Weights only load failed",
                                                                                 "Check the documentation")):
            return line
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                            "Check the documentation"))]
    return (useful or lines or [type(err).__name__])[0]


def _is_refusal(err: BaseException) -> bool:
    """A weights_only refusal (the file names a global it may not) rather than a damaged file."""
    return isinstance(err, pickle.UnpicklingError) and any(word in str(err) for word in _REFUSAL_WORDS[:4])


def load_checkpoint(path: Union[str, os.PathLike], map_location: Any = "cpu",
                    safe_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` with an error that names the file and the reason.

    Only tensors, plain containers, numbers and strings are rebuilt (plus ``safe_globals``,
    for formats such as mmengine's that hold a few known classes); anything else a file
    asks for is refused before it is built.  A missing, empty, truncated or foreign file,
    and a file that would need arbitrary objects, raise :class:`CheckpointError`
    (``FileNotFoundError`` for a missing one).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): a save that was interrupted, "
                              f"a full disk or an incomplete copy")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _is_refusal(err):
            raise CheckpointError(
                f"checkpoint {path!r} ({size} bytes) cannot be read: truncated, corrupted or not a torch "
                f"checkpoint ({_first_reason(err)})") from None
        raise CheckpointError(
            f"checkpoint {path!r} is refused: it asks for objects other than tensors and plain data, "
            f"which could run code when loaded ({_first_reason(err)})") from None
    except Exception as err:  # zip/pickle framing errors: truncated or not a torch file
        raise CheckpointError(
            f"checkpoint {path!r} ({size} bytes) cannot be read: truncated, corrupted or not a torch "
            f"checkpoint ({type(err).__name__}: {_first_reason(err)})") from None


def save_checkpoint(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename.

    ``path`` holds either its previous content or the complete new one, never a partial
    file; when saving fails the temporary file is removed and the error re-raised.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _step_count(group: Dict[str, Any]) -> float:
    step = group.get("step", 0)
    try:
        return float(step)
    except (TypeError, ValueError):
        return 0.0


def missing_optimizer_state(checkpoint: Any, key: str = "optimizer") -> Optional[str]:
    """Why resuming from ``checkpoint`` would restart the optimizer's moments, or ``None``.

    A checkpoint without ``checkpoint[key]``, or whose optimizer state is empty although
    its groups count steps, carries no moments: loading it silently starts them from zero.
    """
    if not isinstance(checkpoint, dict) or key not in checkpoint:
        return f"it has no optimizer state (no {key!r} entry)"
    osd = checkpoint[key]
    if not isinstance(osd, dict) or "state" not in osd:
        return f"its {key!r} entry is not an optimizer state_dict"
    if not osd["state"]:
        steps = max((_step_count(g) for g in osd.get("param_groups", []) if isinstance(g, dict)), default=0)
        if steps > 0:
            return f"its optimizer state is empty although it counts {steps:g} steps"
    return None
