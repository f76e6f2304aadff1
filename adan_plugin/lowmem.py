"""Low-memory Adan state: 8-bit block-wise states and Kahan-compensated 16-bit parameters.

8-bit states (``Adan(..., state_dtype="8bit")``, fused path).  A state tensor
of a parameter with at least ``MIN_NUMEL`` elements is stored as one byte per
element plus one float32 scale per block of ``BLOCK`` elements (in memory
order), under ``state[key]`` (codes, the parameter's shape and strides) and
``state[key + "_scale"]`` (``ceil(numel / BLOCK)`` scales); ``state_dict()`` saves the
codes as ``key + "_codes"`` (see :func:`saved_form`: other Adans must not take them
for float states).  The maps (the
spec; csrc/adan_quant.h is the kernels' copy, tests/test_lowmem.py checks both
against a NumPy one):

* ``exp_avg``, ``exp_avg_diff``, ``neg_pre_grad``: int8 code c in [-127, 127],
  value ``sign(c) * c**2 * A / 127**2`` with A the block's largest ``|x|``;
* ``exp_avg_sq``: uint8 code c in [0, 255] for ``u = sqrt(n)``:
  ``u = c**2 * A / 255**2``, ``n = u**2``, A the block's largest ``sqrt(n)``.

Quantizing: ``s = cmax**2 / A`` (0 when ``A < 1e-30``), ``v = min(|x| * s, cmax**2)``
in float32 (NaN: ``cmax**2``), and ``c`` the integer nearest to ``sqrt(v)``, ties up,
exactly (``(c - 1/2)**2 <= v < (c + 1/2)**2``), with x's sign (+ for NaN); a
positive ``exp_avg_sq`` never gets code 0 (code 1 at least).  Smaller tensors keep
float32 states, complex parameters complex64 ones.  Memory: 4 B + 16/256 B = 4.0625 B per parameter (fp32: 16).

Kahan summation (``kahan_sum=True``): a bfloat16/float16 parameter's state
holds ``kahan_comp`` (same dtype and layout); the parameter's value is taken as
``p + kahan_comp`` in float32 for the update, then ``p`` gets the result
rounded and ``kahan_comp`` the rounding error, so updates smaller than half a
16-bit ulp accumulate instead of vanishing.

Loading: this module registers a :class:`~adan_plugin.validation.StateHook`
that judges codes and their scales as a pair (and the Kahan buffer), so
``Adan.load_state_dict`` refuses a damaged 8-bit state before anything
changes and converts float <-> 8-bit states before installing them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .distributed import is_dtensor
from .functional import STATE_KEYS
from .validation import (EIGHT_BIT, StateHook, _check_finite_moment, _relayout, default_state_dtype,
                         register_state_hook)

BLOCK = 256
MIN_NUMEL = 4096
SCALE_SUFFIX = "_scale"
SCALE_KEYS = tuple(k + SCALE_SUFFIX for k in STATE_KEYS)
CODES_SUFFIX = "_codes"  # 8-bit codes in a saved state_dict (saved_form)
CODES_KEYS = tuple(k + CODES_SUFFIX for k in STATE_KEYS)
KAHAN_KEY = "kahan_comp"
_MIN_ABSMAX = 1e-30
_MAX_SQ_SCALE = float(torch.finfo(torch.float32).max) ** 0.5
_SIGNED_MAX, _UNSIGNED_MAX = 127, 255


def uses_8bit(p: Tensor, state_dtype: Any) -> bool:
    """Whether a parameter's states are 8-bit under ``state_dtype``: complex parameters keep complex64
    states (the kernels step them as their float32 view, whose blocks the codes would have to follow)."""
    return state_dtype == EIGHT_BIT and p.numel() >= MIN_NUMEL and not p.is_complex()


def uses_kahan(p: Tensor, kahan_sum: bool) -> bool:
    return bool(kahan_sum) and p.dtype in (torch.bfloat16, torch.float16)


def n_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def code_dtype(key: str) -> torch.dtype:
    return torch.uint8 if key == "exp_avg_sq" else torch.int8


def is_quantized(state: Dict[str, Any]) -> bool:
    """Whether a parameter's state holds 8-bit states."""
    return isinstance(state.get("exp_avg"), Tensor) and state["exp_avg"].dtype == torch.int8


def zeros_8bit(p: Tensor, key: str) -> Tensor:
    return torch.zeros_like(p, dtype=code_dtype(key), memory_format=torch.preserve_format)


def zero_scales(p: Tensor) -> Tensor:
    return torch.zeros(n_blocks(p.numel()), dtype=torch.float32, device=p.device)


def _memory_order(t: Tensor) -> Tensor:
    """The elements of a dense tensor in memory order (a view when possible)."""
    perm = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    return t.permute(perm).reshape(-1)


def _blocks(flat: Tensor) -> Tensor:
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def quantize(key: str, x: Tensor) -> "tuple[Tensor, Tensor]":
    """``(codes, scales)`` of a float state tensor ``x`` (any dtype) by the map of ``key``."""
    flat = _memory_order(x).to(torch.float32)
    numel = flat.numel()
    blocks = _blocks(flat)
    sq = key == "exp_avg_sq"
    mag = blocks.clamp(min=0).sqrt() if sq else blocks.abs()
    absmax = mag.amax(dim=1)
    cmax = _UNSIGNED_MAX if sq else _SIGNED_MAX
    s = torch.where(absmax >= _MIN_ABSMAX, torch.tensor(float(cmax * cmax)) / absmax, torch.zeros_like(absmax))
    top = float(cmax * cmax)
    v = mag * s[:, None]
    v = torch.where(v < top, v, torch.full_like(v, top))  # NaN -> cmax
    # round(sqrt(v)) exactly: the fp32 floor(sqrt(v) + 1/2) is it or one off; the thresholds
    # (c -+ 1/2)^2 are exact in fp32 (csrc/adan_quant.h, quant_level).
    c = (v.sqrt() + 0.5).floor()
    lo = (c - 0.5) * (c - 0.5)
    c = (c - (v < lo).to(v.dtype) + (v >= lo + c + c).to(v.dtype)).clamp(min=0).to(torch.int32)
    if sq:
        c = torch.where((c == 0) & (blocks > 0), torch.ones_like(c), c)
    else:
        c = torch.where(blocks < 0, -c, c)
    codes = torch.empty_like(x, dtype=code_dtype(key), memory_format=torch.preserve_format)
    _memory_order(codes).copy_(c.reshape(-1)[:numel])
    return codes, absmax


def dequantize(key: str, codes: Tensor, scales: Tensor) -> Tensor:
    """The float32 state that ``codes`` and ``scales`` stand for (``codes``' shape and layout)."""
    sq = key == "exp_avg_sq"
    cmax = _UNSIGNED_MAX if sq else _SIGNED_MAX
    c = _blocks(_memory_order(codes).to(torch.int32))
    k = scales.to(torch.float32) / float(cmax * cmax)
    v = (c * c.abs()).to(torch.float32) * k[:, None]
    if sq:
        v = v * v
    out = torch.empty_like(codes, dtype=torch.float32, memory_format=torch.preserve_format)
    _memory_order(out).copy_(v.reshape(-1)[:codes.numel()])
    return out


def dequantize_state(state: Dict[str, Any], dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """A copy of one parameter's state with 8-bit states replaced by float ones (``dtype``, default fp32)."""
    out = {k: v for k, v in state.items() if k not in SCALE_KEYS}
    if not is_quantized(state):
        return out
    for key in STATE_KEYS:
        if key in state:
            out[key] = dequantize(key, state[key], state[key + SCALE_SUFFIX]).to(dtype or torch.float32)
    return out


def quantize_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of one parameter's state with float states replaced by 8-bit ones (8-bit ones kept)."""
    if is_quantized(state):
        return dict(state)
    out = dict(state)
    for key in STATE_KEYS:
        if key in state:
            out[key], out[key + SCALE_SUFFIX] = quantize(key, state[key])
    return out


def saved_form(state: Any) -> Any:
    """One parameter's state as ``Adan.state_dict()`` writes it: 8-bit codes under ``<key>_codes``.

    Another Adan (timm's, the official, mmpretrain's) loading such a checkpoint directly would take the
    codes for the states themselves: torch's ``Optimizer.load_state_dict`` casts them to the parameter's
    dtype, and the step then runs on values like 87.0 without a word.  Under these names it finds no
    ``exp_avg`` and stops at its first step (``KeyError``); ``convert_state_dict`` writes the float states
    those loaders read.  In memory (``opt.state``) the codes keep the states' own keys."""
    if not isinstance(state, dict) or not is_quantized(state):
        return state
    return {(k + CODES_SUFFIX if k in STATE_KEYS else k): v for k, v in state.items()}


def loaded_form(state: Any, where: str) -> Any:
    """One parameter's saved state with 8-bit codes back under the states' keys (the in-memory form).
    Checkpoints written before the ``_codes`` names hold them there already."""
    if not isinstance(state, dict) or not any(k + CODES_SUFFIX in state for k in STATE_KEYS):
        return state
    both = [k for k in STATE_KEYS if k in state and k + CODES_SUFFIX in state]
    if both:
        raise ValueError(f"{where} holds both '{both[0]}' and '{both[0] + CODES_SUFFIX}': two values for one state")
    return {(k[:-len(CODES_SUFFIX)] if k in CODES_KEYS else k): v for k, v in state.items()}


def kahan_buffer(state: Dict[str, Any], p: Tensor, kahan_sum: bool) -> Optional[Tensor]:
    """The parameter's compensation buffer (created zero on first use), or None when it has none."""
    if not uses_kahan(p, kahan_sum):
        return None
    comp = state.get(KAHAN_KEY)
    if comp is None:
        comp = state[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif comp.dtype != p.dtype:  # the parameter changed dtype (p.data = p.data.half()): carry the error over
        comp = state[KAHAN_KEY] = comp.to(p.dtype)
    return comp


def check_saved_state(st: Dict[str, Any], param: Tensor) -> Optional[str]:
    """What is wrong with a checkpoint's 8-bit states / Kahan buffer for ``param`` (None: nothing)."""
    quantized = is_quantized(st)
    for key in STATE_KEYS:
        value, scale = st.get(key), st.get(key + SCALE_SUFFIX)
        if value is None:
            if scale is not None:
                return f"'{key + SCALE_SUFFIX}' without '{key}'"
            continue
        if not isinstance(value, Tensor):
            return f"state '{key}' is a {type(value).__name__}, not a tensor"
        if not quantized:
            if not (value.is_floating_point() or value.is_complex()):
                return f"state '{key}' is {value.dtype} while 'exp_avg' is not 8-bit (int8)"
            if scale is not None:
                return f"'{key + SCALE_SUFFIX}' next to a {value.dtype} '{key}' (scales belong to 8-bit states)"
            continue
        if value.dtype != code_dtype(key):
            return f"8-bit state '{key}' must be {code_dtype(key)}, got {value.dtype}"
        blocks = n_blocks(param.numel())
        if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (blocks,):
            got = (f"{scale.dtype} of shape {tuple(scale.shape)}" if isinstance(scale, Tensor)
                   else type(scale).__name__)
            return (f"8-bit state '{key}' needs '{key + SCALE_SUFFIX}', a float32 tensor of shape ({blocks},) "
                    f"(one scale per {BLOCK} elements), got {got}")
    comp = st.get(KAHAN_KEY)
    if comp is not None and (not isinstance(comp, Tensor) or not comp.is_floating_point()):
        return f"'{KAHAN_KEY}' must be a floating-point tensor"
    return None


def _hook_claims(st: Dict[str, Any]) -> List[str]:
    """8-bit codes with their scales, and the Kahan buffer: checked and converted here, not per key."""
    keys = [KAHAN_KEY] if KAHAN_KEY in st else []
    if is_quantized(st):
        keys += [k for k in STATE_KEYS + SCALE_KEYS if k in st]
    return keys


def _hook_check(st: Dict[str, Any], param: Tensor, where: str) -> None:
    """Refuse a damaged 8-bit state or Kahan buffer (see :func:`check_saved_state`), before anything changes."""
    problem = check_saved_state(st, param)
    if problem:
        raise ValueError(f"{where}: {problem}")
    if is_quantized(st):
        for key in STATE_KEYS:
            if key not in st:
                continue
            codes, scale, at = st[key], st[key + SCALE_SUFFIX], f"{where}['{key}']"
            if codes.device.type == "meta" or scale.device.type == "meta":
                raise ValueError(f"{at} or its scales are meta tensors (no data)")
            if codes.layout != torch.strided or scale.layout != torch.strided:
                raise ValueError(f"{at}: 8-bit codes and scales must be dense tensors")
            if tuple(codes.shape) != tuple(param.shape):
                raise ValueError(f"{at} has shape {tuple(codes.shape)}, the parameter has {tuple(param.shape)}")
            # Load-time reads of the values (a host sync on a GPU, once), as for float moments.
            if key != "exp_avg_sq" and bool((codes == -_SIGNED_MAX - 1).any()):
                raise ValueError(f"{at} holds code -128; 8-bit codes lie in [-127, 127]")
            if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
                raise ValueError(f"{where}['{key + SCALE_SUFFIX}'] holds NaN, Inf or negative scales (block maxima)")
            # exp_avg_sq's scale is the block's largest sqrt(n): past sqrt(float32 max) its n is Inf,
            # which a float exp_avg_sq may not hold either.
            if key == "exp_avg_sq" and not bool(torch.isfinite(scale * scale).all()):
                raise ValueError(f"{where}['{key + SCALE_SUFFIX}'] holds scales above {_MAX_SQ_SCALE:.3g}: "
                                 "the exp_avg_sq they stand for overflows float32")
    if KAHAN_KEY in st:
        _check_finite_moment(st[KAHAN_KEY], param, f"{where}['{KAHAN_KEY}']")


def _hook_adapt(out: Dict[str, Any], st: Dict[str, Any], p: Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
    """The checked state in this optimizer's format: 8-bit codes kept bit for bit (re-quantized only for
    another memory layout) or quantized from float states where ``state_dtype='8bit'`` applies,
    dequantized otherwise; a Kahan buffer kept only where ``kahan_sum`` applies."""
    state_dtype = group.get("state_dtype")
    out = {k: v for k, v in out.items() if k not in SCALE_KEYS}
    coded = [k for k in STATE_KEYS if isinstance(out.get(k), Tensor) and out[k].dtype == code_dtype(k)]
    for key in coded:
        codes, scale = out[key].to(p.device), st[key + SCALE_SUFFIX].to(p.device).contiguous()
        if uses_8bit(p, state_dtype) and (codes.stride() == p.stride() or is_dtensor(p)):
            out[key], out[key + SCALE_SUFFIX] = codes, scale
        else:
            out[key] = _relayout(dequantize(key, codes, scale), p, default_state_dtype(p, state_dtype))
    if uses_8bit(p, state_dtype):
        for key in STATE_KEYS:
            if key in out and out[key].is_floating_point():
                out[key], out[key + SCALE_SUFFIX] = quantize(key, _relayout(out[key], p, torch.float32))
    if KAHAN_KEY in out:
        if uses_kahan(p, group.get("kahan_sum", False)):
            out[KAHAN_KEY] = _relayout(out[KAHAN_KEY], p, p.dtype)
        else:
            del out[KAHAN_KEY]
    return out


register_state_hook(StateHook(keys=SCALE_KEYS + (KAHAN_KEY,), claims=_hook_claims, check=_hook_check,
                              adapt=_hook_adapt, unsave=loaded_form))
