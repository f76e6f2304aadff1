"""The Adan update, written once per execution strategy.

Every function here takes the same arguments: parallel lists of parameters,
gradients and the four state tensors, plus keyword hyper-parameters.
Betas follow the code convention (the paper's 1 - beta).  ``grad_coef`` is an
optional 0-dim device tensor that multiplies every gradient (the global clip
coefficient); the stored ``neg_pre_grad`` is the negated *scaled* gradient,
as in the official implementation.

On entry ``neg_pre_grads`` must hold minus the previous (scaled) gradient;
the caller seeds it with ``-g`` on a parameter's first step so that the
gradient difference is zero there.

``kahan_comps`` (``kahan_sum``): per parameter, None or its compensation
buffer; such a parameter is updated in float32 as ``p + comp`` and stored
rounded, the rounding error going back into ``comp`` (adan_plugin.lowmem).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

# Per-parameter state, named as the official, timm and mmpretrain Adans name it.
STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")
# The moment buffers: without them a checkpoint cannot be resumed.
MOMENT_KEYS = STATE_KEYS[:3]


def _bias_corrections(step: int, beta1: float, beta2: float, beta3: float):
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    bc3_sqrt = math.sqrt(1.0 - beta3 ** step)
    return bc1, bc2, bc3_sqrt


def _caution_mask(exp_avg: Tensor, grad: Tensor) -> Tensor:
    # Cautious optimizers (arXiv 2411.16085), as timm applies them to Adan:
    # keep the momentum term only where it agrees in sign with the gradient,
    # rescaled so that the mean update magnitude is preserved.
    mask = (exp_avg * grad > 0).to(grad.dtype)
    return mask.div_(mask.mean().clamp_(min=1e-3))


def _upcast(tensors):
    """fp32 working copies of 16-bit tensors (fp32/fp64 ones are used as they are)."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def _adan_one(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_diff: Tensor,
              neg: Tensor, *, step_size: float, step_size_diff: float, bc3_sqrt: float, lr: float,
              beta1: float, beta2: float, beta3: float, eps: float, weight_decay: float, no_prox: bool,
              caution: bool, grad_coef: Optional[Tensor]) -> None:
    if grad_coef is not None:
        grad = grad * grad_coef
    # ``neg`` is reused as scratch: first the difference g - g_prev, then
    # g + beta2 * diff, and finally -g for the next step.
    neg.add_(grad)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_diff.lerp_(neg, 1 - beta2)
    neg.mul_(beta2).add_(grad)
    exp_avg_sq.mul_(beta3).addcmul_(neg, neg, value=1 - beta3)
    denom = exp_avg_sq.sqrt().div_(bc3_sqrt).add_(eps)
    m = exp_avg * _caution_mask(exp_avg, grad) if caution else exp_avg
    if weight_decay != 0 and no_prox:
        param.mul_(1 - lr * weight_decay)
    param.addcdiv_(m, denom, value=-step_size)
    param.addcdiv_(exp_avg_diff, denom, value=-step_size_diff)
    if weight_decay != 0 and not no_prox:
        param.div_(1 + lr * weight_decay)
    torch.neg(grad, out=neg)


def _kahan_store(exact: Tensor, param: Tensor, comp: Tensor) -> None:
    """``param`` <- ``exact`` rounded, ``comp`` <- what the rounding lost (``exact`` is consumed)."""
    param.copy_(exact)
    comp.copy_(exact.sub_(param))


def _single_tensor_adan(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    exp_avg_diffs: List[Tensor],
    neg_pre_grads: List[Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    caution: bool,
    grad_coef: Optional[Tensor] = None,
    kahan_comps: Optional[List[Optional[Tensor]]] = None,
) -> None:
    bc1, bc2, bc3_sqrt = _bias_corrections(step, beta1, beta2, beta3)
    hyper = dict(step_size=lr / bc1, step_size_diff=lr * beta2 / bc2, bc3_sqrt=bc3_sqrt, lr=lr, beta1=beta1,
                 beta2=beta2, beta3=beta3, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                 caution=caution, grad_coef=grad_coef)
    comps = kahan_comps if kahan_comps is not None else [None] * len(params)
    for tensors, comp in zip(zip(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads), comps):
        if torch.is_complex(tensors[0]):
            tensors = tuple(torch.view_as_real(t) for t in tensors)
            comp = None if comp is None else torch.view_as_real(comp)
        # 16-bit tensors: fp32 math on working copies, written back once (eps
        # alone underflows to 0 in fp16), as the fused kernels do in registers.
        work = _upcast(tensors)
        kahan = comp is not None and work[0] is not tensors[0]
        if kahan:  # the compensated value p + comp, stored back rounded (and its error) below
            work[0].add_(comp)
        _adan_one(*work, **hyper)
        for t, w in zip(tensors, work):
            if w is not t and t is not tensors[1] and not (kahan and t is tensors[0]):
                t.copy_(w)
        if kahan:
            _kahan_store(work[0], tensors[0], comp)


def _multi_tensor_adan(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    exp_avg_diffs: List[Tensor],
    neg_pre_grads: List[Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    caution: bool,
    grad_coef: Optional[Tensor] = None,
    kahan_comps: Optional[List[Optional[Tensor]]] = None,
) -> None:
    if not params:
        return
    bc1, bc2, bc3_sqrt = _bias_corrections(step, beta1, beta2, beta3)
    # One bucket per (device, parameter dtype, state dtype, Kahan or not): torch's grouping
    # helper wants one dtype across the lists, and fp16 parameters keep fp32 states.
    comps = kahan_comps if kahan_comps is not None else [None] * len(params)
    buckets: Dict[tuple, List[int]] = {}
    for i, (p, m, c) in enumerate(zip(params, exp_avgs, comps)):
        kahan = c is not None and p.dtype in (torch.float16, torch.bfloat16)
        buckets.setdefault((p.device, p.dtype, m.dtype, kahan), []).append(i)
    for (_, _, _, kahan), idx in buckets.items():
        lists = [[ts[i] for i in idx] for ts in (params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads)]
        bucket_comps = [comps[i] for i in idx] if kahan else None
        if torch.is_complex(lists[0][0]):
            lists = [[torch.view_as_real(t) for t in ts] for ts in lists]
            bucket_comps = None if bucket_comps is None else [torch.view_as_real(c) for c in bucket_comps]
        work = [_upcast(ts) for ts in lists]
        if kahan:  # fp32 working copies of the compensated values p + comp
            torch._foreach_add_(work[0], bucket_comps)
        _multi_tensor_adan_bucket(*work, bc1=bc1, bc2=bc2, bc3_sqrt=bc3_sqrt, lr=lr, beta1=beta1, beta2=beta2,
                                  beta3=beta3, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                                  caution=caution, grad_coef=grad_coef)
        for k in (0, 2, 3, 4, 5):  # never the gradients
            changed = [(t, w) for t, w in zip(lists[k], work[k]) if w is not t]
            if changed:
                torch._foreach_copy_([t for t, _ in changed], [w for _, w in changed])
        if kahan:  # p got the rounded value above; comp gets what the rounding lost
            torch._foreach_sub_(work[0], lists[0])
            torch._foreach_copy_(bucket_comps, work[0])


def _multi_tensor_adan_bucket(device_params, device_grads, device_m, device_n, device_d, device_neg, *,
                              bc1, bc2, bc3_sqrt, lr, beta1, beta2, beta3, eps, weight_decay, no_prox,
                              caution, grad_coef) -> None:
    if grad_coef is not None:
        coef = grad_coef.to(device_grads[0].device, non_blocking=True)
        device_grads = torch._foreach_mul(device_grads, coef)
    torch._foreach_add_(device_neg, device_grads)
    torch._foreach_lerp_(device_m, device_grads, 1 - beta1)
    torch._foreach_lerp_(device_d, device_neg, 1 - beta2)
    torch._foreach_mul_(device_neg, beta2)
    torch._foreach_add_(device_neg, device_grads)
    torch._foreach_mul_(device_n, beta3)
    torch._foreach_addcmul_(device_n, device_neg, device_neg, value=1 - beta3)
    denom = torch._foreach_sqrt(device_n)
    torch._foreach_div_(denom, bc3_sqrt)
    torch._foreach_add_(denom, eps)
    m = device_m
    if caution:
        m = torch._foreach_mul(device_m, [_caution_mask(a, g) for a, g in zip(device_m, device_grads)])
    if weight_decay != 0 and no_prox:
        torch._foreach_mul_(device_params, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(device_params, m, denom, value=-lr / bc1)
    torch._foreach_addcdiv_(device_params, device_d, denom, value=-lr * beta2 / bc2)
    if weight_decay != 0 and not no_prox:
        torch._foreach_div_(device_params, 1 + lr * weight_decay)
    torch._foreach_copy_(device_neg, device_grads)
    torch._foreach_neg_(device_neg)
