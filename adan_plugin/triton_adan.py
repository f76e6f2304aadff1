"""The fused Adan step as a Triton kernel: the fused path on GPUs where our CUDA kernels were not built
(a wheel installed without nvcc), on NVIDIA, AMD (ROCm) and Intel (XPU) GPUs alike.

Same contract as ``torch.ops.adan_plugin.fused_adan_`` (csrc/README.md, "The op"), registered as the
custom op ``torch.ops.adan_plugin.fused_adan_triton_``: six tensor lists, fp32 math for fp32/bf16/fp16
parameters and states, ``grad_coef``/``grad_scale``/``found_inf``/``step_tensor``/``param_steps`` read on
the device, first steps recognised on the device, no host sync, no temporaries.

Many tensors per launch.  One program (CUDA block) updates one chunk of ``CHUNK`` elements of one
tensor; it finds its tensor through two small device tables:

* a tensor table, one int64 row per tensor: the six data addresses, the address of its step count
  (0 without one) and its element count;
* a chunk table, one (tensor row, chunk index) int32 pair per program.

So a whole parameter group is one launch (``MAX_PROGRAMS`` per launch; more chunks take several).
optimi launches once per tensor and torch's inductor passes every pointer as a kernel argument of a
generated kernel; a table keeps one hand-written kernel for any number of tensors.  Building the
tables is host work plus a host-to-device copy, so they are cached, keyed by every address and size
they hold, and rebuilt only when the tensor set changes (new state, a checkpoint load, gradients
reallocated at new addresses).  The copy comes from pinned memory with ``non_blocking=True``: the host
never waits, and a step captured in a CUDA graph after a warm-up step (which also JIT-compiles the
kernel) reuses the cached tables (reasoned, not run: no GPU here).  The cache holds ``_CACHE_SIZE``
plans (one per parameter bucket and first-step split of a group).  What stays per step on the host is
checking every tensor (as the C++ op does, here in Python) and the cache key.

The tables hide the pointers from the compiler, so the op is opaque: a ``torch.library`` op with the
C++ op's schema (declared mutations; ``torch.library.custom_op`` refuses keyword-only tensors) and a fake
implementation, which ``torch.compile`` traces around as it does the C++ op; not
``torch.library.triton_op``, whose mutation analysis sees only kernel arguments.

Tensors whose six addresses are all 16-byte aligned (every tensor the caching allocator hands out)
run in a launch compiled with alignment hints (16-byte vector loads); the others in a launch
without.  Full ``BLOCK``s run unmasked, only a chunk's tail is masked.

fp32 -> bf16 rounding is written out as integer operations (round to nearest even, as torch and
the GPU's conversion instruction round): Triton's interpreter truncates bf16 conversions, and the
same code must run in it and on the GPU.  ``TRITON_INTERPRET=1`` (set before this module is imported)
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

BLOCK = 1024          # elements per vector operation of a program
CHUNK = 16 * BLOCK    # elements per program
MAX_PROGRAMS = 65535  # programs per launch; a plan with more chunks takes several launches
NUM_WARPS = 4
_CACHE_SIZE = 64
_OP = "adan_plugin.fused_adan_triton_"


# ------------------------------------------------------------------------------------ the kernel
@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        # Round to nearest even by hand (the interpreter truncates), NaN kept quiet as torch does.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16)
        out = tl.where(x != x, 0x7FC0, out).to(tl.uint16)
        return out.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _lerp(start, end, w, w_rest, LOW: tl.constexpr):
    # torch.lerp's two formulas (csrc/adan_math.h adan_lerp), picked on the host by the weight.
    if LOW:
        return start + w * (end - start)
    else:
        return end - (end - start) * w_rest


@triton.jit
def _adan_elements(p_ptr, g_ptr, m_ptr, n_ptr, d_ptr, neg_ptr, offs, mask, first, grad_mul,
                   beta2, beta3, w1, w1_rest, w2, w2_rest, w3, step_size, step_size_diff, inv_bc3_sqrt, eps,
                   decay_mul, inv_decay_div,
                   P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, LOW1: tl.constexpr, LOW2: tl.constexpr):
    # csrc/adan_math.h adan_update, operation for operation.
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_mul
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    n = tl.load(n_ptr + offs, mask=mask).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=mask).to(tl.float32)
    neg = tl.load(neg_ptr + offs, mask=mask).to(tl.float32)
    diff = tl.where(first, 0.0, g + neg)
    m = _lerp(m, g, w1, w1_rest, LOW1)
    d = _lerp(d, diff, w2, w2_rest, LOW2)
    u = diff * beta2 + g
    n = n * beta3 + w3 * (u * u)
    denom = tl.sqrt_rn(n) * inv_bc3_sqrt + eps
    p = p * decay_mul
    p = p - tl.div_rn(step_size * m + step_size_diff * d, denom)
    p = p * inv_decay_div
    tl.store(p_ptr + offs, _to_storage(p, P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, _to_storage(m, S_DTYPE), mask=mask)
    tl.store(n_ptr + offs, _to_storage(n, S_DTYPE), mask=mask)
    tl.store(d_ptr + offs, _to_storage(d, S_DTYPE), mask=mask)
    tl.store(neg_ptr + offs, _to_storage(0.0 - g, S_DTYPE), mask=mask)


@triton.jit
def _one_minus_pow(beta, e):
    # 1 - beta**e in float64 by repeated squaring (e a non-negative integer): only multiplications,
    # which every Triton backend has in float64; csrc/adan_math.h uses pow() in double.
    r = tl.full([], 1.0, tl.float64)
    b = beta
    while e > 0:
        r = tl.where((e & 1) != 0, r * b, r)
        b = b * b
        e = e >> 1
    return 1.0 - r


@triton.jit(do_not_specialize=["chunk_base", "host_step"])
def _adan_kernel(tensor_table, chunk_table, chunk_base,
                 step_ptr, grad_coef_ptr, grad_scale_ptr, found_inf_ptr, host_step,
                 lr_hi, lr_lo, beta1_hi, beta1_lo, beta2_hi, beta2_lo, beta3_hi, beta3_lo,
                 beta2, beta3, w1, w1_rest, w2, w2_rest, w3, eps, decay_mul, inv_decay_div,
                 FIRST: tl.constexpr, HAS_PARAM_STEPS: tl.constexpr, ALIGNED: tl.constexpr,
                 LOW1: tl.constexpr, LOW2: tl.constexpr,
                 P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    c = chunk_base + tl.program_id(0)
    t = tl.load(chunk_table + 2 * c).to(tl.int64)
    start = tl.load(chunk_table + 2 * c + 1).to(tl.int64) * CHUNK
    row = tensor_table + 8 * t
    n = tl.minimum(tl.load(row + 7) - start, CHUNK)
    if found_inf_ptr is not None:  # AMP overflow: write nothing
        n = tl.where(tl.load(found_inf_ptr) != 0.0, 0, n)

    # Step-dependent scalars in float64 (hi + lo recovers the double the host holds).
    if step_ptr is not None:
        step = tl.load(step_ptr)
        k = step.to(tl.int64)
        first = step == 1.0
    else:
        k = tl.cast(host_step, tl.int64)
        first = k == 1
    if FIRST:
        first = first | True
    if HAS_PARAM_STEPS:
        first = first | (tl.load(tl.load(row + 6).to(tl.pointer_type(tl.float32))) == 1.0)
    lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)
    b1 = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
    b2 = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
    b3 = tl.cast(beta3_hi, tl.float64) + tl.cast(beta3_lo, tl.float64)
    step_size = (lr / _one_minus_pow(b1, k)).to(tl.float32)
    step_size_diff = (lr * b2 / _one_minus_pow(b2, k)).to(tl.float32)
    inv_bc3_sqrt = (1.0 / tl.sqrt(_one_minus_pow(b3, k))).to(tl.float32)  # float64: IEEE sqrt
    grad_mul = tl.full([], 1.0, tl.float32)
    if grad_coef_ptr is not None:
        grad_mul = tl.load(grad_coef_ptr)
    if grad_scale_ptr is not None:
        grad_mul = tl.div_rn(grad_mul, tl.load(grad_scale_ptr))

    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(S_DTYPE))
    n_ptr = tl.load(row + 3).to(tl.pointer_type(S_DTYPE))
    d_ptr = tl.load(row + 4).to(tl.pointer_type(S_DTYPE))
    neg_ptr = tl.load(row + 5).to(tl.pointer_type(S_DTYPE))
    if ALIGNED:  # checked on the host for all six: lets the compiler use 16-byte loads
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        n_ptr = tl.multiple_of(n_ptr, 16)
        d_ptr = tl.multiple_of(d_ptr, 16)
        neg_ptr = tl.multiple_of(neg_ptr, 16)
    p_ptr += start
    g_ptr += start
    m_ptr += start
    n_ptr += start
    d_ptr += start
    neg_ptr += start

    full = n // BLOCK
    for b in range(0, full):
        offs = b * BLOCK + tl.arange(0, BLOCK)
        _adan_elements(p_ptr, g_ptr, m_ptr, n_ptr, d_ptr, neg_ptr, offs, None, first, grad_mul,
                       beta2, beta3, w1, w1_rest, w2, w2_rest, w3, step_size, step_size_diff, inv_bc3_sqrt,
                       eps, decay_mul, inv_decay_div, P_DTYPE, S_DTYPE, LOW1, LOW2)
    if full * BLOCK < n:
        offs = full * BLOCK + tl.arange(0, BLOCK)
        _adan_elements(p_ptr, g_ptr, m_ptr, n_ptr, d_ptr, neg_ptr, offs, offs < n, first, grad_mul,
                       beta2, beta3, w1, w1_rest, w2, w2_rest, w3, step_size, step_size_diff, inv_bc3_sqrt,
                       eps, decay_mul, inv_decay_div, P_DTYPE, S_DTYPE, LOW1, LOW2)


# ---------------------------------------------------------------------------------- device support
def interpreted() -> bool:
    """Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return not isinstance(_adan_kernel, triton.runtime.JITFunction)


def supports(device: torch.device) -> Tuple[bool, str]:
    """Whether the Triton kernel can run on ``device``, and if not, why."""
    if interpreted():
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


def _check_scalar(t: Optional[Tensor], name: str, device: torch.device) -> None:
    if t is None:
        return
    if t.numel() != 1 or t.dtype != torch.float32:
        raise RuntimeError(f"{_OP}: {name} must be a one-element float32 tensor, got {t.dtype} of shape "
                           f"{tuple(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"{_OP}: {name} is on {t.device}, the parameters on {device} (it is read on the "
                           "device, never copied)")


def _check(lists: Sequence[Sequence[Tensor]], step_tensor, param_steps, grad_coef, grad_scale, found_inf):
    """The C++ op's checks (csrc/adan_ops.cpp), with its messages: all before anything is written."""
    n = len(lists[0])
    if any(len(ts) != n for ts in lists):
        raise RuntimeError(f"{_OP}: the six tensor lists must have the same length, got "
                           f"{', '.join(str(len(ts)) for ts in lists)}")
    if param_steps and len(param_steps) != n:
        raise RuntimeError(f"{_OP}: param_steps must be empty or have one entry per parameter")
    if param_steps and step_tensor is None:
        raise RuntimeError(f"{_OP}: param_steps needs step_tensor (device-step mode)")
    if n == 0:
        return
    device, p_dtype, s_dtype = lists[0][0].device, lists[0][0].dtype, lists[2][0].dtype
    if p_dtype not in _DTYPES:
        raise RuntimeError(f"{_OP}: parameters must be float32, bfloat16 or float16, got {p_dtype}")
    if s_dtype not in _DTYPES:
        raise RuntimeError(f"{_OP}: states must be float32, bfloat16 or float16, got {s_dtype}")
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
            want = p_dtype if k == 1 else s_dtype
            if t.device != device or t.dtype != want:
                raise RuntimeError(f"{_OP}: {_NAMES[k - 1]} of parameter {i} is {t.dtype} on {t.device}, "
                                   f"expected {want} on {device}")
            if t.shape != shape or t.stride() != stride:
                raise RuntimeError(f"{_OP}: {_NAMES[k - 1]} of parameter {i} has sizes {tuple(t.shape)} and "
                                   f"strides {t.stride()}; the parameter has {tuple(shape)} and {stride}")
        if param_steps:
            _check_scalar(param_steps[i], "param_steps[i]", device)
    for name, t in (("step_tensor", step_tensor), ("grad_coef", grad_coef), ("grad_scale", grad_scale),
                    ("found_inf", found_inf)):
        _check_scalar(t, name, device)


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


def _plan(lists: Sequence[Sequence[Tensor]], param_steps: Sequence[Tensor]) -> List[_Launch]:
    ptrs = [[t.data_ptr() for t in ts] for ts in lists]
    numels = [t.numel() for t in lists[0]]
    step_ptrs = [t.data_ptr() for t in param_steps] if param_steps else [0] * len(numels)
    device = lists[0][0].device
    key = (device, CHUNK, MAX_PROGRAMS, *map(tuple, ptrs), tuple(step_ptrs), tuple(numels))
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    rows: Dict[bool, Tuple[list, list]] = {True: ([], []), False: ([], [])}
    for i, numel in enumerate(numels):
        if numel == 0:
            continue
        six = [ptrs[k][i] for k in range(6)]
        tensor_rows, chunk_rows = rows[all(a % 16 == 0 for a in six)]
        chunk_rows.extend((len(tensor_rows), j) for j in range(triton.cdiv(numel, CHUNK)))
        tensor_rows.append(six + [step_ptrs[i], numel])
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
    ``torch.ops.adan_plugin.fused_adan_triton_``.  8-bit states and Kahan buffers (the op's scale and
    ``kahan_comps`` lists) are not implemented: non-empty lists are refused."""
    if any(len(x) for x in (exp_avg_scales, exp_avg_sq_scales, exp_avg_diff_scales, neg_pre_grad_scales,
                            kahan_comps)):
        raise RuntimeError("adan_plugin.fused_adan_triton_: 8-bit states and kahan_comps are not implemented "
                           "by the Triton kernels; use the compiled ones (fused_backend=None or 'cuda')")
    lists = (params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads)
    _check(lists, step_tensor, param_steps, grad_coef, grad_scale, found_inf)
    if not params:
        return
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
        P_DTYPE=_DTYPES[params[0].dtype], S_DTYPE=_DTYPES[exp_avgs[0].dtype], BLOCK=BLOCK, CHUNK=CHUNK,
        num_warps=NUM_WARPS,
    )
    device = params[0].device
    # Triton launches on the current device: make it the parameters' one.
    with getattr(torch, device.type).device(device) if device.type in ("cuda", "xpu") else nullcontext():
        for launch in _plan(lists, param_steps):
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
