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
            _register_fake()
            _loaded = True
        except (ImportError, OSError) as err:
            _loaded, _load_error = False, err
    return _loaded


def _register_fake() -> None:
    # The op returns nothing and only mutates its (declared) arguments, so
    # tracing (torch.compile, FakeTensor) needs no shape logic.
    @torch.library.register_fake("adan_plugin::fused_adan_")
    def _fused_adan_fake(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, *, lr, beta1,
                         beta2, beta3, eps, weight_decay, no_prox, step, first, step_tensor=None,
                         param_steps=(), grad_coef=None, grad_scale=None, found_inf=None) -> None:
        return None


def require_extension() -> None:
    """Raise ``RuntimeError`` with the build hint when the kernels are not built."""
    if not extension_loaded():
        raise RuntimeError(f"Adan(fused=True): {BUILD_HINT} (import error: {_load_error})")


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
