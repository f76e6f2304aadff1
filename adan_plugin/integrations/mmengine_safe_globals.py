"""The objects an mmengine checkpoint contains, allow-listed for ``torch.load(weights_only=True)``.

Since torch 2.6, ``torch.load`` refuses every global it does not know, and
mmengine 0.10 loads checkpoints with the default, so ``--resume`` fails on
what mmengine itself saved: the message hub's ``HistoryBuffer`` objects (numpy
arrays inside), numpy scalars in its runtime info, and the statistics methods
a ``HistoryBuffer`` pickles by reference (``getattr(HistoryBuffer, 'mean')``).

Turning ``weights_only`` off would let a checkpoint file run any code.  Instead
exactly these objects are allowed:

* ``mmengine.logging.HistoryBuffer``;
* numpy arrays and scalars of numeric and bool dtypes (``_reconstruct``,
  ``ndarray``, ``dtype``, ``scalar`` and the numeric dtype classes; not the
  object dtype, whose elements would be arbitrary pickles);
* ``getattr``, replaced by a function that resolves only
  ``getattr(HistoryBuffer, <statistics method>)`` and rejects anything else.

Everything else a checkpoint might name is still rejected by torch.
"""
from __future__ import annotations

import contextlib
import pickle
from typing import Any, Iterator, List, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

SafeGlobal = Union[Any, Tuple[Any, str]]


def history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as a checkpoint may use it: only ``HistoryBuffer``'s statistics methods."""
    methods = HistoryBuffer._statistics_methods
    if obj is HistoryBuffer and isinstance(name, str) and name in methods:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"this checkpoint asks for getattr({obj!r}, {name!r}); an mmengine checkpoint only references "
        f"HistoryBuffer's statistics methods ({', '.join(sorted(methods))}), so it is refused")


def _numpy_globals() -> List[SafeGlobal]:
    core = np._core if hasattr(np, "_core") else np.core
    found: List[SafeGlobal] = [np.ndarray, np.dtype]
    # Checkpoints written under numpy 1 name numpy.core, under numpy 2 numpy._core.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found.append((core.multiarray._reconstruct, f"{module}._reconstruct"))
        found.append((core.multiarray.scalar, f"{module}.scalar"))
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64)
    found.extend(type(np.dtype(t)) for t in numeric)
    return found


def mmengine_checkpoint_globals() -> List[SafeGlobal]:
    """What ``torch.serialization.add_safe_globals`` needs for mmengine checkpoints."""
    return [HistoryBuffer, (history_buffer_getattr, "builtins.getattr")] + _numpy_globals()


@contextlib.contextmanager
def mmengine_safe_globals() -> Iterator[None]:
    """Within this block ``torch.load(weights_only=True)`` accepts mmengine checkpoints."""
    # HistoryBuffer registers its default statistics methods on first use.
    HistoryBuffer()
    with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
        yield


def allow_mmengine_checkpoints() -> None:
    """Process-wide :func:`mmengine_safe_globals` (for launchers that cannot wrap the run)."""
    HistoryBuffer()
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
