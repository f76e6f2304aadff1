"""Access to the fused kernels: the compiled ones in ``adan_plugin._C`` (built by setup.py) and the
Triton ones in ``adan_plugin.triton_adan`` (imported only when asked for), and the choice between them.

Importing ``adan_plugin._C`` registers the ``torch.ops.adan_plugin`` custom
ops.  Everything but the fused path works without it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .validation import EIGHT_BIT

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
            # Raises RuntimeError on a bad ADAN_PLUGIN_CPU_ISA, so an optimizer
            # refuses it when it is built rather than in the middle of a step.
            torch.ops.adan_plugin._cpu_isa()
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
                         param_steps=(), grad_coef=None, grad_scale=None, found_inf=None, exp_avg_scales=(),
                         exp_avg_sq_scales=(), exp_avg_diff_scales=(), neg_pre_grad_scales=(),
                         kahan_comps=()) -> None:
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


# ------------------------------------------------------------------------------------ fused backends
FUSED_BACKENDS = ("cpu", "cuda", "triton")
_triton_status: Dict[torch.device, Tuple[bool, str]] = {}


def triton_supported(device: torch.device) -> Tuple[bool, str]:
    """Whether the Triton kernels run on ``device`` (Triton importable, a device it supports), and if
    not, why.  Imports triton on the first call only."""
    if device not in _triton_status:
        try:
            from . import triton_adan
        except Exception as err:  # not installed, or an install that fails to initialise
            _triton_status[device] = (False, f"Triton is not importable ({type(err).__name__}: {err})")
        else:
            _triton_status[device] = triton_adan.supports(device)
    return _triton_status[device]


def select_fused_backend(device: torch.device, requested: Optional[str] = None,
                         triton_lacks: Sequence[str] = (), state_dtype: Any = None) -> Tuple[Optional[str], str]:
    """The fused backend that steps parameters on ``device``, or ``(None, why not)``.

    ``requested`` (``Adan(fused_backend=...)``) forces one of FUSED_BACKENDS; ``None`` picks the
    compiled kernels when built for the device, else the Triton kernels when Triton supports the device
    (never for CPU tensors: there only an explicit ``"triton"`` runs them, in Triton's interpreter).
    ``state_dtype`` is the group's: for ``"8bit"`` on a GPU Triton comes first: on an H100 (GPT-2 1.3B
    shapes, docs/benchmarks.md) its tiles of quantization blocks stepped in 13.98-14.05 ms, the CUDA
    kernel's warp-per-block code in 19.61 ms (1.4x).
    ``triton_lacks`` names the enabled options the Triton kernels do not implement."""
    if requested in ("cpu", "cuda"):
        if device.type != requested:
            return None, f"fused_backend={requested!r} runs on {requested} tensors, not on {device}"
        if not extension_loaded():
            return None, f"{BUILD_HINT} (import error: {_load_error})"
        if not fused_supported(device):
            return None, "adan_plugin._C was built without its CUDA kernels (no CUDA toolkit at install time)"
        return requested, ""
    compiled_why = ""
    if requested is None:
        if state_dtype == EIGHT_BIT and device.type == "cuda" and not triton_lacks and triton_supported(device)[0]:
            return "triton", ""
        if device.type in ("cpu", "cuda") and fused_supported(device):
            return device.type, ""
        compiled_why = (f"{BUILD_HINT} (import error: {_load_error})" if not extension_loaded()
                        else f"the fused kernels do not support parameters on {device}")
        if device.type == "cpu":
            return None, compiled_why
    if triton_lacks:
        why = f"the Triton kernels do not implement {', '.join(triton_lacks)}"
    else:
        ok, why = triton_supported(device)
        if ok:
            return "triton", ""
    return None, f"{compiled_why}; Triton: {why}" if compiled_why else why


def fused_op(backend: str) -> Callable:
    """The op of a backend that ``select_fused_backend`` returned."""
    if backend == "triton":
        from . import triton_adan  # noqa: F401  (registers the op)
        return torch.ops.adan_plugin.fused_adan_triton_
    return torch.ops.adan_plugin.fused_adan_
