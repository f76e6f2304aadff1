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
from typing import List, Optional

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
    step_size = lr / bc1
    step_size_diff = lr * beta2 / bc2
    comps = kahan_comps if kahan_comps is not None else [None] * len(params)
    for param, grad, exp_avg, exp_avg_sq, exp_avg_diff, neg, comp in zip(
            params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, comps):
        if torch.is_complex(param):
            param, grad, exp_avg, exp_avg_sq, exp_avg_diff, neg = (
                torch.view_as_real(t) for t in (param, grad, exp_avg, exp_avg_sq, exp_avg_diff, neg))
            comp = None if comp is None else torch.view_as_real(comp)
        stored = param
        if comp is not None:  # update the compensated value in fp32; stored back rounded below
            param = param.float().add_(comp)
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
        if comp is not None:
            _kahan_store(param, stored, comp)
        torch.neg(grad, out=neg)


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
    lists = [params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads]
    if kahan_comps is not None:
        # A parameter's dtype decides whether it has a buffer (16-bit: yes), so a (device, dtype) group
        # has all or none; the parameter itself fills the slots of those without.
        lists.append([c if c is not None else p for c, p in zip(kahan_comps, params)])
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(lists)
    for device_lists, _ in grouped.values():
        device_params, device_grads, device_m, device_n, device_d, device_neg = device_lists[:6]
        device_comps = None
        if kahan_comps is not None and device_params[0].dtype in (torch.bfloat16, torch.float16):
            device_comps = device_lists[6]
        if torch.is_complex(device_params[0]):
            device_params, device_grads, device_m, device_n, device_d, device_neg = (
                [torch.view_as_real(t) for t in ts]
                for ts in (device_params, device_grads, device_m, device_n, device_d, device_neg))
            if device_comps is not None:
                device_comps = [torch.view_as_real(t) for t in device_comps]
        stored = device_params
        if device_comps is not None:
            device_params = torch._foreach_add([p.float() for p in stored], device_comps)
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
        if device_comps is not None:
            torch._foreach_copy_(stored, device_params)
            torch._foreach_sub_(device_params, stored)
            torch._foreach_copy_(device_comps, device_params)
        torch._foreach_copy_(device_neg, device_grads)
        torch._foreach_neg_(device_neg)
