"""The fused Adan step as a Triton kernel: the fused path on GPUs where our CUDA kernels were not built
(a wheel installed without nvcc), on NVIDIA, AMD (ROCm) and Intel (XPU) GPUs alike.

Same contract as ``torch.ops.adan_plugin.fused_adan_`` (csrc/README.md, "The op"), registered as the
custom op ``torch.ops.adan_plugin.fused_adan_triton_``: six tensor lists, fp32 math for fp32/bf16/fp16
parameters and states, ``grad_coef``/``grad_scale``/``found_inf``/``step_tensor``/``param_steps`` read on
the device, first steps recognised on the device, no host sync, no temporaries; 8-bit block-wise states
(``state_dtype="8bit"``: int8/uint8 codes and the four scale lists) and Kahan-compensated 16-bit
parameters (``kahan_comps``), as the C++ op (csrc/README.md, "8-bit states and Kahan summation").

Many tensors per launch.  One program (CUDA block) updates one chunk of ``CHUNK`` elements of one
tensor; it finds its tensor through two small device tables:

* a tensor table, one int64 row per tensor: the six data addresses, the address of its step count
  (0 without one), its element count, the addresses of its four scale lists (8-bit states) and of its
  Kahan buffer (0 without);
* a chunk table, one (tensor row, chunk index) int32 pair per program.

So a whole parameter group is one launch (``MAX_PROGRAMS`` per launch; more chunks take several).
optimi launches once per tensor and torch's inductor passes every pointer as a kernel argument of a
generated kernel; a table keeps one hand-written kernel for any number of tensors.  Building the
tables is host work plus a host-to-device copy, so they are cached, keyed by every address and size
they hold, and rebuilt only when the tensor set changes (new state, a checkpoint load, gradients
reallocated at new addresses).  The copy comes from pinned memory with ``non_blocking=True``: the host
never waits, and a step captured in a CUDA graph after a warm-up step (which also JIT-compiles the
kernel) reuses the cached tables (run on an H100: tests/test_triton_cuda.py).  The cache holds ``_CACHE_SIZE``
plans (one per parameter bucket and first-step split of a group).  What stays per step on the host is
checking every tensor (as the C++ op does, here in Python) and the cache key.

The tables hide the pointers from the compiler, so the op is opaque: a ``torch.library`` op with the
C++ op's schema (declared mutations; ``torch.library.custom_op`` refuses keyword-only tensors) and a fake
implementation, which ``torch.compile`` traces around as it does the C++ op; not
``torch.library.triton_op``, whose mutation analysis sees only kernel arguments.

The kernel (its math, the 8-bit tiles, alignment hints and bf16 rounding) is in
adan_plugin/triton_kernels.py.  ``TRITON_INTERPRET=1`` (set before this module is imported)
runs the kernel on CPU tensors; the tests use that, and ``Adan(fused_backend="triton")`` accepts CPU
parameters only then.  This module imports triton; ``adan_plugin._ext`` imports it only when asked.
"""
from __future__ import annotations

import struct
from collections import OrderedDict
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .adan import _is_dense
from .triton_kernels import _adan_kernel

BLOCK = 1024          # elements per vector operation of a program
CHUNK = 16 * BLOCK    # elements per program
MAX_PROGRAMS = 65535  # programs per launch; a plan with more chunks takes several launches
NUM_WARPS = 4
QBLOCK = 256          # elements per 8-bit quantization block (csrc/adan_quant.h kQBlock); divides CHUNK and BLOCK
_ROW = 13             # int64 entries per row of the tensor table (see _adan_kernel)
_CACHE_SIZE = 64
_OP = "adan_plugin.fused_adan_triton_"


# ---------------------------------------------------------------------------------- device support
def interpreted() -> bool:
    """Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return not isinstance(_adan_kernel, triton.runtime.JITFunction)


def supports(device: torch.device) -> Tuple[bool, str]:
    """Whether the Triton kernel can run on ``device``, and if not, why."""
    if interpreted():
        if isinstance(tl.max, triton.runtime.JITFunction):
            return False, ("triton.language was imported before TRITON_INTERPRET=1 was set, so its helpers "
                           "(tl.max) are compiled-only and the interpreted kernel cannot call them")
        if device.type == "cpu":
            return True, ""
        return False, ("Triton's interpreter (TRITON_INTERPRET=1, a test facility) runs the Triton kernels "
                       f"on CPU tensors only, not on {device}")
    if device.type == "cpu":
        return False, ("the Triton kernels run on GPUs (CUDA, ROCm, XPU); CPU tensors only under "
                       "TRITON_INTERPRET=1, a test facility")
    if device.type == "cuda":
        if torch.version.hip is None and torch.cuda.get_device_capability(device) < (7, 0):
            return False, f"Triton needs a GPU of compute capability 7.0 or newer, {device} is older"
        return True, ""
    if device.type == "xpu":
        return True, ""
    return False, f"the Triton kernels do not run on {device.type} tensors"


# ------------------------------------------------------------------------------------ validation
_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_NAMES = ("grad", "exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")
_SCALE_NAMES = ("exp_avg_scales", "exp_avg_sq_scales", "exp_avg_diff_scales", "neg_pre_grad_scales")


def _check_scalar(t: Optional[Tensor], name: str, device: torch.device) -> None:
    if t is None:
        return
    if t.numel() != 1 or t.dtype != torch.float32:
        raise RuntimeError(f"{_OP}: {name} must be a one-element float32 tensor, got {t.dtype} of shape "
                           f"{tuple(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"{_OP}: {name} is on {t.device}, the parameters on {device} (it is read on the "
                           "device, never copied)")


def _check_lowmem(params: Sequence[Tensor], q8: bool, scales: Sequence[Sequence[Tensor]],
                  comps: Sequence[Tensor]) -> None:
    """csrc/adan_ops.cpp check_lowmem_args: 8-bit states' scales and Kahan compensations."""
    n = len(params)
    for name, ts in zip(_SCALE_NAMES, scales):
        if (len(ts) != n) if q8 else len(ts):
            want = "have one entry per parameter with 8-bit (int8) states" if q8 else \
                "be empty unless the states are 8-bit"
            raise RuntimeError(f"{_OP}: {name} must {want}, got {len(ts)} for {n} parameters")
        for i, s in enumerate(ts):
            p = params[i]
            blocks = triton.cdiv(p.numel(), QBLOCK)
            if s.dtype != torch.float32 or s.device != p.device or not s.is_contiguous() or s.numel() != blocks:
                raise RuntimeError(f"{_OP}: {name}[{i}] must be a contiguous float32 tensor of {blocks} elements "
                                   f"(one per {QBLOCK} elements) on {p.device}, got {s.dtype} of shape "
                                   f"{tuple(s.shape)} on {s.device}")
    if comps and len(comps) != n:
        raise RuntimeError(f"{_OP}: kahan_comps must be empty or have one entry per parameter, got {len(comps)} "
                           f"for {n}")
    for i, c in enumerate(comps):
        p = params[i]
        if p.dtype not in (torch.bfloat16, torch.float16):
            raise RuntimeError(f"{_OP}: kahan_comps are for bfloat16/float16 parameters, parameter {i} is {p.dtype}")
        if c.dtype != p.dtype or c.device != p.device or c.shape != p.shape or c.stride() != p.stride():
            raise RuntimeError(f"{_OP}: kahan_comps[{i}] must match its parameter ({p.dtype} {tuple(p.shape)} "
                               f"strides {p.stride()} on {p.device}), got {c.dtype} {tuple(c.shape)} strides "
                               f"{c.stride()} on {c.device}")


def _check(lists: Sequence[Sequence[Tensor]], step_tensor, param_steps, grad_coef, grad_scale, found_inf,
           scales: Sequence[Sequence[Tensor]] = ((), (), (), ()), comps: Sequence[Tensor] = ()) -> bool:
    """The C++ op's checks (csrc/adan_ops.cpp), with its messages: all before anything is written.
    Returns whether the states are 8-bit."""
    n = len(lists[0])
    if any(len(ts) != n for ts in lists):
        raise RuntimeError(f"{_OP}: the six tensor lists must have the same length, got "
                           f"{', '.join(str(len(ts)) for ts in lists)}")
    if param_steps and len(param_steps) != n:
        raise RuntimeError(f"{_OP}: param_steps must be empty or have one entry per parameter")
    if param_steps and step_tensor is None:
        raise RuntimeError(f"{_OP}: param_steps needs step_tensor (device-step mode)")
    if n == 0:
        return False
    device, p_dtype, s_dtype = lists[0][0].device, lists[0][0].dtype, lists[2][0].dtype
    if p_dtype not in _DTYPES:
        raise RuntimeError(f"{_OP}: parameters must be float32, bfloat16 or float16, got {p_dtype}")
    q8 = s_dtype == torch.int8
    if s_dtype not in _DTYPES and not q8:
        raise RuntimeError(f"{_OP}: states must be float32, bfloat16 or float16 (or 8-bit: int8, with a uint8 "
                           f"exp_avg_sq and scales), got {s_dtype}")
    for i in range(n):
        p = lists[0][i]
        if p.device != device or p.dtype != p_dtype:
            raise RuntimeError(f"{_OP}: parameter {i} is {p.dtype} on {p.device}; one call takes one device and "
                               f"one parameter dtype ({p_dtype} on {device})")
        if not (p.is_contiguous() or _is_dense(p)):
            raise RuntimeError(f"{_OP}: parameter {i} is not dense (strides {p.stride()})")
        shape, stride = p.shape, p.stride()
        for k in range(1, 6):
            t = lists[k][i]
            want = p_dtype if k == 1 else (torch.uint8 if q8 and k == 3 else s_dtype)
            if t.device != device or t.dtype != want:
                raise RuntimeError(f"{_OP}: {_NAMES[k - 1]} of parameter {i} is {t.dtype} on {t.device}, "
                                   f"expected {want} on {device}")
            if t.shape != shape or t.stride() != stride:
                raise RuntimeError(f"{_OP}: {_NAMES[k - 1]} of parameter {i} has sizes {tuple(t.shape)} and "
                                   f"strides {t.stride()}; the parameter has {tuple(shape)} and {stride}")
        if param_steps:
            _check_scalar(param_steps[i], "param_steps[i]", device)
    _check_lowmem(lists[0], q8, scales, comps)
    for name, t in (("step_tensor", step_tensor), ("grad_coef", grad_coef), ("grad_scale", grad_scale),
                    ("found_inf", found_inf)):
        _check_scalar(t, name, device)
    return q8


# ------------------------------------------------------------------------------------ launch plan
class _Launch:
    """One alignment class of a call: its tables on the device and its launches."""

    __slots__ = ("aligned", "tensor_table", "chunk_table", "launches", "_pinned")

    def __init__(self, aligned, tensor_rows, chunk_rows, device):
        self.aligned = aligned
        host = [torch.tensor(tensor_rows, dtype=torch.int64), torch.tensor(chunk_rows, dtype=torch.int32)]
        if device.type != "cpu":
            # Pinned + non_blocking: an asynchronous copy the host does not wait for; the pinned
            # buffers live as long as the plan, so the copy never reads freed memory.
            host = [t.pin_memory() for t in host]
            self._pinned = host
            self.tensor_table, self.chunk_table = (t.to(device, non_blocking=True) for t in host)
        else:
            self._pinned = None
            self.tensor_table, self.chunk_table = host
        n_chunks = len(chunk_rows)
        self.launches = [(base, min(MAX_PROGRAMS, n_chunks - base)) for base in range(0, n_chunks, MAX_PROGRAMS)]


_plans: "OrderedDict[tuple, List[_Launch]]" = OrderedDict()


def _plan(lists: Sequence[Sequence[Tensor]], param_steps: Sequence[Tensor],
          scales: Sequence[Sequence[Tensor]], comps: Sequence[Tensor]) -> List[_Launch]:
    ptrs = [[t.data_ptr() for t in ts] for ts in lists]
    numels = [t.numel() for t in lists[0]]
    none = [0] * len(numels)
    step_ptrs = [t.data_ptr() for t in param_steps] if param_steps else none
    scale_ptrs = [[t.data_ptr() for t in ts] if ts else none for ts in scales]
    comp_ptrs = [t.data_ptr() for t in comps] if comps else none
    device = lists[0][0].device
    key = (device, CHUNK, MAX_PROGRAMS, *map(tuple, ptrs), tuple(step_ptrs), tuple(numels),
           *map(tuple, scale_ptrs), tuple(comp_ptrs))
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    rows: Dict[bool, Tuple[list, list]] = {True: ([], []), False: ([], [])}
    for i, numel in enumerate(numels):
        if numel == 0:
            continue
        six = [ptrs[k][i] for k in range(6)]
        tensor_rows, chunk_rows = rows[all(a % 16 == 0 for a in six + [comp_ptrs[i]])]
        chunk_rows.extend((len(tensor_rows), j) for j in range(triton.cdiv(numel, CHUNK)))
        tensor_rows.append(six + [step_ptrs[i], numel] + [sp[i] for sp in scale_ptrs] + [comp_ptrs[i]])
    plan = [_Launch(aligned, tensor_rows, chunk_rows, device)
            for aligned, (tensor_rows, chunk_rows) in rows.items() if chunk_rows]
    _plans[key] = plan
    if len(_plans) > _CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


def _split(x: float) -> Tuple[float, float]:
    """``x`` as two float32 values whose float64 sum is ``x`` to ~2^-48 (scalar kernel arguments are
    float32)."""
    hi = _f32(x)
    return hi, _f32(x - hi)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


# ---------------------------------------------------------------------------------------- the op
def _fused_adan_triton(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                       exp_avg_sqs: List[Tensor], exp_avg_diffs: List[Tensor], neg_pre_grads: List[Tensor], *,
                       lr: float, beta1: float, beta2: float, beta3: float, eps: float, weight_decay: float,
                       no_prox: bool, step: float, first: bool, step_tensor: Optional[Tensor] = None,
                       param_steps: Sequence[Tensor] = (), grad_coef: Optional[Tensor] = None,
                       grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
                       exp_avg_scales: Sequence[Tensor] = (), exp_avg_sq_scales: Sequence[Tensor] = (),
                       exp_avg_diff_scales: Sequence[Tensor] = (), neg_pre_grad_scales: Sequence[Tensor] = (),
                       kahan_comps: Sequence[Tensor] = ()) -> None:
    """``torch.ops.adan_plugin.fused_adan_`` (csrc/README.md) with the Triton kernel; registered as
    ``torch.ops.adan_plugin.fused_adan_triton_``.  8-bit states (int8 ``exp_avgs``, with the four scale
    lists) and Kahan buffers (``kahan_comps``) as in the C++ op."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads)
    scales = (exp_avg_scales, exp_avg_sq_scales, exp_avg_diff_scales, neg_pre_grad_scales)
    q8 = _check(lists, step_tensor, param_steps, grad_coef, grad_scale, found_inf, scales, kahan_comps)
    if not params:
        return
    if q8 and (CHUNK % QBLOCK or BLOCK % QBLOCK):
        raise RuntimeError(f"{_OP}: CHUNK ({CHUNK}) and BLOCK ({BLOCK}) must hold whole quantization blocks "
                           f"of {QBLOCK}")
    w1, w2, w3 = _f32(1.0 - beta1), _f32(1.0 - beta2), _f32(1.0 - beta3)
    decay = weight_decay != 0.0
    lr_hi, lr_lo = _split(lr)
    beta1_hi, beta1_lo = _split(beta1)
    beta2_hi, beta2_lo = _split(beta2)
    beta3_hi, beta3_lo = _split(beta3)
    scalars = dict(
        step_ptr=step_tensor, grad_coef_ptr=grad_coef, grad_scale_ptr=grad_scale, found_inf_ptr=found_inf,
        host_step=int(step), lr_hi=lr_hi, lr_lo=lr_lo, beta1_hi=beta1_hi, beta1_lo=beta1_lo, beta2_hi=beta2_hi,
        beta2_lo=beta2_lo, beta3_hi=beta3_hi, beta3_lo=beta3_lo, beta2=_f32(beta2), beta3=_f32(beta3),
        w1=w1, w1_rest=_f32(1.0 - w1), w2=w2, w2_rest=_f32(1.0 - w2), w3=w3, eps=_f32(eps),
        decay_mul=_f32(1.0 - lr * weight_decay) if decay and no_prox else 1.0,
        inv_decay_div=_f32(1.0 / (1.0 + lr * weight_decay)) if decay and not no_prox else 1.0,
        FIRST=bool(first), HAS_PARAM_STEPS=bool(param_steps), LOW1=w1 < 0.5, LOW2=w2 < 0.5,
        P_DTYPE=_DTYPES[params[0].dtype], S_DTYPE=tl.int8 if q8 else _DTYPES[exp_avgs[0].dtype], Q8=q8,
        HAS_COMP=bool(kahan_comps), ROW=_ROW, BLOCK=BLOCK, CHUNK=CHUNK, QBLOCK=QBLOCK, num_warps=NUM_WARPS,
    )
    device = params[0].device
    # Triton launches on the current device: make it the parameters' one.
    with getattr(torch, device.type).device(device) if device.type in ("cuda", "xpu") else nullcontext():
        for launch in _plan(lists, param_steps, scales, kahan_comps):
            for base, programs in launch.launches:
                _adan_kernel[(programs,)](launch.tensor_table, launch.chunk_table, base, ALIGNED=launch.aligned,
                                          **scalars)


# The C++ op's schema (csrc/adan_ops.cpp), declared mutations included, so torch.compile treats both ops
# alike; torch.library.custom_op would refuse its keyword-only tensor arguments.
_SCHEMA = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
           "Tensor(d!)[] exp_avg_diffs, Tensor(e!)[] neg_pre_grads, *, float lr, float beta1, float beta2, "
           "float beta3, float eps, float weight_decay, bool no_prox, float step, bool first, "
           "Tensor? step_tensor=None, Tensor[] param_steps, Tensor? grad_coef=None, Tensor? grad_scale=None, "
           "Tensor? found_inf=None, Tensor(f!)[] exp_avg_scales, Tensor(g!)[] exp_avg_sq_scales, "
           "Tensor(h!)[] exp_avg_diff_scales, Tensor(i!)[] neg_pre_grad_scales, Tensor(j!)[] kahan_comps) -> ()")
_lib = torch.library.Library("adan_plugin", "FRAGMENT")
_lib.define("fused_adan_triton_" + _SCHEMA)
for _key in ("CPU", "CUDA", "XPU"):
    _lib.impl("fused_adan_triton_", _fused_adan_triton, _key)


@torch.library.register_fake("adan_plugin::fused_adan_triton_", lib=_lib)
def _fused_adan_triton_fake(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, *, lr, beta1,
                            beta2, beta3, eps, weight_decay, no_prox, step, first, step_tensor=None,
                            param_steps=(), grad_coef=None, grad_scale=None, found_inf=None, exp_avg_scales=(),
                            exp_avg_sq_scales=(), exp_avg_diff_scales=(), neg_pre_grad_scales=(),
                            kahan_comps=()) -> None:
    return None
