"""Access to the compiled kernels in ``adan_plugin._C`` (built by setup.py).

Importing ``adan_plugin._C`` registers the ``torch.ops.adan_plugin`` custom
ops.  Everything but the fused path works without it.
"""
from __future__ import annotations

from typing import Optional

import torch

_load_error: Optional[BaseException] = None
_loaded: Optional[bool] = None

BUILD_HINT = (
    "adan_plugin was installed without its compiled extension (adan_plugin._C). "
    "Rebuild it from the source tree with `pip install --no-build-isolation -e .` "
    "(set FORCE_CUDA=1 to force the CUDA kernels, TORCH_CUDA_ARCH_LIST to pick GPU "
    "architectures; ADAN_NO_EXT=1 skips the build)."
)


def extension_loaded() -> bool:
    """True when the compiled ops are importable (cached after the first call)."""
    global _loaded, _load_error
    if _loaded is None:
        try:
            from . import _C  # noqa: F401  (registers torch.ops.adan_plugin)
            _loaded = True
        except (ImportError, OSError) as err:
            _loaded, _load_error = False, err
    return _loaded


def load_error() -> Optional[BaseException]:
    extension_loaded()
    return _load_error


def fused_supported(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device``."""
    if not extension_loaded():
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(getattr(torch.ops.adan_plugin, "_has_cuda", lambda: False)())
    return False
