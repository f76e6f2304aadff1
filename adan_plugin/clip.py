"""Global gradient-norm clipping computed on the device.

The official and mmpretrain Adans call ``.item()`` on the clip coefficient
every step; here the coefficient stays a 0-dim device tensor that the update
multiplies in, so ``step()`` never waits for the device.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch import Tensor


def grad_sq_norm(grads: Iterable[Tensor], device: Optional[torch.device] = None) -> Tensor:
    """Sum of squares of every element of ``grads``, as a 0-dim fp32 tensor.

    Reductions run per device (one ``_foreach_norm`` launch each) in fp32 so
    that fp16/bf16 gradients do not overflow; the partial sums are then
    gathered on ``device`` (default: the first gradient's device).
    """
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for g in grads:
        if torch.is_complex(g):
            g = torch.view_as_real(g)
        by_device[g.device].append(g)
    if not by_device:
        return torch.zeros((), dtype=torch.float32, device=device)
    if device is None:
        device = next(iter(by_device))
    total = None
    for dev, tensors in by_device.items():
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        part = torch.linalg.vector_norm(torch.stack(norms)).square()
        part = part.to(device, non_blocking=True)
        total = part if total is None else total + part
    return total


def clip_coefficient(sq_norm: Tensor, max_norm: float, eps: float) -> Tensor:
    """``min(1, max_norm / (sqrt(sq_norm) + eps))`` without leaving the device."""
    return (max_norm / (sq_norm.sqrt() + eps)).clamp_(max=1.0)
