"""The fused Adan path: one ``torch.ops.adan_plugin.fused_adan_`` call per
(device, parameter dtype, state dtype) reads p, g, m, n, d, neg_pre_grad and
writes all but g, in one pass over memory.

Two ways to count steps:

* host mode (default): ``group['step']`` is a Python int, as in the unfused
  paths and the official/timm/mmpretrain Adans;
* device mode (``capturable=True``, AMP ``found_inf`` given, or a group
  already counting on the device):
  ``group['step']`` is a 0-dim float32 tensor on the parameters' device and
  every parameter's state holds its own ``'step'`` tensor.  Both advance by
  ``1 - found_inf`` on the device, so a skipped AMP step changes nothing and
  the host never waits.  A parameter's first step (difference zero) is
  recognised on the device from its own count, so it stays right when
  GradScaler skips the very first steps or a gradient first arrives late.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor

from . import _ext, lowmem
from .distributed import any_sharded, is_dtensor, local_tensors
from .functional import MOMENT_KEYS, STATE_KEYS
from .validation import default_state_dtype

_M, _N, _D, _NEG = STATE_KEYS
# Parameter dtypes the kernels take (complex64 as its float32 view).
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)


def _scalar_on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if t is None or (t.device == device and t.dtype == torch.float32):
        return t
    return t.to(device=device, dtype=torch.float32, non_blocking=True)


def _fused_adan(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    exp_avg_diffs: List[Tensor],
    neg_pre_grads: List[Tensor],
    *,
    step: Union[int, Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    caution: bool,
    grad_coef: Optional[Tensor] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    param_steps: Optional[List[Tensor]] = None,
    first: bool = False,
    backend: Optional[str] = None,
    kahan_comps: Optional[List[Optional[Tensor]]] = None,
    state_scales: Optional[List[Optional[List[Tensor]]]] = None,
    state_dtype: Any = None,
) -> None:
    """Same contract as ``_single_tensor_adan``, plus:

    step: a host int, or a 0-dim float32 device tensor (device mode).
    grad_scale: gradients are divided by it (AMP), in registers.
    found_inf: when nonzero, nothing is written (decided on the device).
    param_steps: per-parameter step tensors (device mode); a parameter whose
        count is 1 takes its first step (gradient difference zero).
    first: every parameter takes its first step; ``neg_pre_grads`` are then
        only written, never read.
    backend: force a fused backend (``Adan(fused_backend=...)``); ``None``: the
        compiled kernels when built for the device, else Triton's
        (``_ext.select_fused_backend``).
    state_dtype: the group's ``state_dtype``, for the backend choice only (an 8-bit
        group takes Triton first on a GPU, its small fp32-state tensors too: one
        backend per group).

    Unlike the unfused paths, ``neg_pre_grads`` need not be seeded with -g:
    first steps are known from ``step``/``param_steps``/``first``.
    States may have another dtype than the parameters (``state_dtype``).
    kahan_comps: per parameter, its Kahan compensation (16-bit parameters) or None.
    state_scales: per parameter with 8-bit states (int8 ``exp_avgs``), the four
        states' per-block scales (adan_plugin.lowmem), else None.
    """
    if caution:
        raise ValueError("Adan: the fused kernels do not implement caution=True; use fused=False")
    if not params:
        return
    step_tensor = step if isinstance(step, Tensor) else None
    host_step = 0.0 if step_tensor is not None else float(step)
    keys = [(p.device, p.dtype, m.dtype) for p, m in zip(params, exp_avgs)]
    whole = keys.count(keys[0]) == len(keys)  # the usual case: one call on the lists as given
    buckets: Dict[Any, List[int]] = {keys[0]: list(range(len(keys)))} if whole else {}
    if not whole:
        for i, key in enumerate(keys):
            buckets.setdefault(key, []).append(i)
    ops = {}
    for device, _, _ in buckets:  # every bucket's backend settled before the first writes
        if device not in ops:
            name, why = _ext.select_fused_backend(device, backend, (), state_dtype)
            if name is None:
                raise RuntimeError(f"Adan(fused=True): no fused backend for parameters on {device}: {why}")
            ops[device] = _ext.fused_op(name)
    for (device, _, _), idx in buckets.items():
        lists = [ts if whole else [ts[i] for i in idx]
                 for ts in (params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads)]
        comps = (kahan_comps if whole else [kahan_comps[i] for i in idx]) if kahan_comps is not None else []
        comps = comps if comps and comps[0] is not None else []
        scales = [[state_scales[i][k] for i in idx] for k in range(4)] if exp_avgs[idx[0]].dtype == torch.int8 \
            else [[], [], [], []]
        if torch.is_complex(lists[0][0]):
            lists = [[torch.view_as_real(t) for t in ts] for ts in lists]
            comps = [torch.view_as_real(t) for t in comps]
        ops[device](
            *lists,
            lr=float(lr), beta1=beta1, beta2=beta2, beta3=beta3, eps=eps, weight_decay=weight_decay,
            no_prox=bool(no_prox), step=host_step, first=bool(first),
            step_tensor=_scalar_on(step_tensor, device),
            param_steps=[param_steps[i] for i in idx] if param_steps is not None else [],
            grad_coef=_scalar_on(grad_coef, device), grad_scale=_scalar_on(grad_scale, device),
            found_inf=_scalar_on(found_inf, device),
            exp_avg_scales=scales[0], exp_avg_sq_scales=scales[1], exp_avg_diff_scales=scales[2],
            neg_pre_grad_scales=scales[3], kahan_comps=comps,
        )


def _local_lowmem(hyper: Dict[str, Any]) -> None:
    """Kahan buffers of DTensor parameters as their local shards (8-bit states refuse DTensors)."""
    if "kahan_comps" in hyper:
        hyper["kahan_comps"] = [None if c is None else local_tensors([c])[0][0] for c in hyper["kahan_comps"]]


def _device_step(value: Any, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.device == device and value.dtype == torch.float32 and value.dim() == 0:
            return value
        return value.to(device=device, dtype=torch.float32).reshape(())
    # A fill kernel, not a host-to-device copy: fine under sync-debug mode.
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _in_layout_of(t: Tensor, p: Tensor) -> Tensor:
    """``t`` with ``p``'s strides: the kernels take every tensor of a parameter in its layout.

    A gradient or state in another layout (a channels_last gradient of a
    contiguous parameter, a state loaded or created before the parameter
    changed layout) is copied; in the common case nothing is.
    """
    if t.stride() == p.stride() or is_dtensor(t) or is_dtensor(p):
        return t
    return torch.empty_like(p, dtype=t.dtype, memory_format=torch.preserve_format).copy_(t)


def fused_group_step(optimizer, group: Dict[str, Any], params: List[Tensor], grads: List[Tensor],
                     grad_coef: Optional[Tensor], grad_scale: Optional[Tensor],
                     found_inf: Optional[Tensor], hparams: Optional[Dict[str, float]] = None) -> None:
    """Advance ``group``'s step count and apply the fused update to ``params``.

    ``hparams``: the group's hyper-parameters as host floats (``Adan.step`` reads them once).
    """
    # Once a group counts on the device it stays there: its per-parameter
    # counts are then the only record of which first steps were skipped.
    device_mode = bool(group.get("capturable")) or found_inf is not None or isinstance(group.get("step"), Tensor)
    state_dtype = group.get("state_dtype")
    if state_dtype == lowmem.EIGHT_BIT and any_sharded(params):
        raise ValueError("Adan: state_dtype='8bit' does not support sharded (DTensor) parameters yet: its "
                         "quantization blocks would straddle shards")
    fresh: List[bool] = []
    m, n, d, neg, param_steps, comps, scales = [], [], [], [], [], [], []
    if device_mode:
        home = (params or group["params"])[0].device
        step_t = _device_step(group.get("step", 0), home)
        group["step"] = step_t
    # Per parameter and step: the common case (states exist, every tensor already in the
    # parameter's layout, plain tensors) costs a few attribute reads; anything else takes
    # the general code below.
    eight_bit_group = state_dtype == lowmem.EIGHT_BIT
    kahan_sum = group.get("kahan_sum", False)
    states = optimizer.state
    laid_out = []
    for p, g in zip(params, grads):
        stride = p.stride()
        laid_out.append(g if g.stride() == stride else _in_layout_of(g, p))
        state = states[p]
        eight_bit = eight_bit_group and lowmem.uses_8bit(p, state_dtype)
        is_fresh = len(state) == 0 or "neg_pre_grad" not in state
        if len(state) == 0 or (MOMENT_KEYS[0] not in state and not any(k in state for k in MOMENT_KEYS)):
            sd = default_state_dtype(p, state_dtype)
            for key in MOMENT_KEYS:
                if eight_bit:
                    state[key], state[key + lowmem.SCALE_SUFFIX] = lowmem.zeros_8bit(p, key), lowmem.zero_scales(p)
                else:
                    state[key] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
        if "neg_pre_grad" not in state:
            state["neg_pre_grad"] = torch.zeros_like(state["exp_avg"], memory_format=torch.preserve_format)
            if eight_bit:
                state["neg_pre_grad" + lowmem.SCALE_SUFFIX] = lowmem.zero_scales(p)
        sm, sn, sd_, sneg = state[_M], state[_N], state[_D], state[_NEG]
        if not (sm.stride() == stride and sn.stride() == stride and sd_.stride() == stride
                and sneg.stride() == stride):
            for key in STATE_KEYS:
                if state[key].stride() == stride:
                    continue  # already in the parameter's layout (what _in_layout_of would return)
                if eight_bit and not is_dtensor(p):
                    # Codes in another layout than the parameter's: their blocks follow memory
                    # order, so they are re-quantized in the parameter's (rare: a layout change).
                    value = _in_layout_of(lowmem.dequantize(key, state[key], state[key + lowmem.SCALE_SUFFIX]), p)
                    state[key], state[key + lowmem.SCALE_SUFFIX] = lowmem.quantize(key, value)
                else:
                    state[key] = _in_layout_of(state[key], p)
            sm, sn, sd_, sneg = state[_M], state[_N], state[_D], state[_NEG]
        comp = lowmem.kahan_buffer(state, p, kahan_sum) if kahan_sum else None
        if comp is not None and comp.stride() != stride:
            comp = state[lowmem.KAHAN_KEY] = _in_layout_of(comp, p)
        comps.append(comp)
        scales.append([state[k] for k in lowmem.SCALE_KEYS] if eight_bit else None)
        if device_mode:
            ps = state.get("step")
            if ps is None:
                # Fresh parameters count from 0 (their first fused step makes
                # it 1 = first step); state from elsewhere is as old as its group.
                ps = torch.zeros((), dtype=torch.float32, device=p.device) if is_fresh else step_t.clone()
            state["step"] = ps = _device_step(ps, p.device)
            if is_fresh:
                ps.zero_()
            param_steps.append(ps)
        fresh.append(is_fresh)
        m.append(sm)
        n.append(sn)
        d.append(sd_)
        neg.append(sneg)
    grads = laid_out

    if hparams is None:
        beta1, beta2, beta3 = group["betas"]
        hparams = dict(lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3, eps=group["eps"],
                       weight_decay=group["weight_decay"])
    hyper = dict(lr=hparams["lr"], beta1=hparams["beta1"], beta2=hparams["beta2"], beta3=hparams["beta3"],
                 eps=hparams["eps"], weight_decay=hparams["weight_decay"], no_prox=group["no_prox"],
                 caution=group["caution"], grad_coef=grad_coef, grad_scale=grad_scale, found_inf=found_inf,
                 backend=group.get("fused_backend"), state_dtype=state_dtype)
    if kahan_sum and any(c is not None for c in comps):
        hyper["kahan_comps"] = comps
    if eight_bit_group and any(sc is not None for sc in scales):
        hyper["state_scales"] = scales
    if device_mode:
        inc: Union[int, Tensor] = 1 if found_inf is None else 1 - _scalar_on(found_inf, step_t.device)
        step_t.add_(inc)
        if param_steps:
            if isinstance(inc, Tensor):
                by_dev: Dict[torch.device, List[Tensor]] = {}
                for ps in param_steps:
                    by_dev.setdefault(ps.device, []).append(ps)
                for dev, steps in by_dev.items():
                    # The list overload: the Tensor-scalar one reads its scalar with .item() on
                    # some backends (a host sync on a GPU).
                    inc_dev = _scalar_on(inc, dev)
                    torch._foreach_add_(steps, [inc_dev] * len(steps))
            else:
                torch._foreach_add_(param_steps, 1)
            params, grads, m, n, d, neg = local_tensors(params, grads, m, n, d, neg)
            _local_lowmem(hyper)
            _fused_adan(params, grads, m, n, d, neg, step=step_t, param_steps=param_steps, **hyper)
        return

    group["step"] = int(group.get("step", 0)) + 1
    if not params:
        return
    # DTensor (FSDP2) shards: the update is elementwise, so each rank updates its own.
    params, grads, m, n, d, neg = local_tensors(params, grads, m, n, d, neg)
    _local_lowmem(hyper)
    # Parameters without a previous gradient take their first step in a call
    # of their own (usually none; all of them on a group's first step).
    if not any(fresh) or all(fresh):
        _fused_adan(params, grads, m, n, d, neg, step=group["step"], first=fresh[0], **hyper)
        return
    for want_first in (False, True):
        idx = [i for i, f in enumerate(fresh) if f == want_first]
        if idx:
            pick = lambda ts: [ts[i] for i in idx]  # noqa: E731
            picked = {k: pick(v) if k in ("kahan_comps", "state_scales") else v for k, v in hyper.items()}
            _fused_adan(pick(params), pick(grads), pick(m), pick(n), pick(d), pick(neg),
                        step=group["step"], first=want_first, **picked)
