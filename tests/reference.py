"""A float64 Adan written from the paper's Algorithm 1 (arXiv 2208.06677).

Independent of adan_plugin's code: every implementation path is checked
against it.  Betas are in the code convention (the paper's 1 - beta):
the paper's (0.02, 0.08, 0.01) are (0.98, 0.92, 0.99) here.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor


class RefAdan:
    """Algorithm 1 in float64, one group step counter per group.

    ``groups``: dicts with ``params`` (tensors, copied to float64) and the
    hyper-parameters ``lr, betas, eps, weight_decay, no_prox, caution``.
    """

    def __init__(self, groups: Sequence[Dict], max_grad_norm: float = 0.0, clip_eps: float = 1e-8):
        self.groups = []
        for g in groups:
            g = dict(g)
            g["params"] = [p.detach().to(torch.float64).clone() for p in g["params"]]
            g.setdefault("caution", False)
            g["k"] = 0
            g["state"] = [None] * len(g["params"])
            self.groups.append(g)
        self.max_grad_norm = max_grad_norm
        self.clip_eps = clip_eps

    def step(self, grads: Sequence[Sequence[Optional[Tensor]]]) -> None:
        grads = [[None if x is None else x.detach().to(torch.float64) for x in gs] for gs in grads]
        coef = 1.0
        if self.max_grad_norm > 0:
            total = math.sqrt(sum(float((x * x).sum()) for gs in grads for x in gs if x is not None))
            coef = min(1.0, self.max_grad_norm / (total + self.clip_eps))
        for group, gs in zip(self.groups, grads):
            group["k"] += 1
            k = group["k"]
            b1, b2, b3 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for i, (theta, g) in enumerate(zip(group["params"], gs)):
                if g is None:
                    continue
                g = g * coef
                st = group["state"][i]
                if st is None:
                    z = torch.zeros_like(theta)
                    st = group["state"][i] = {"m": z.clone(), "d": z.clone(), "n": z.clone(), "g_prev": None}
                # First step of a parameter (or of the group after a restart):
                # no previous gradient, so the difference is zero.
                diff = torch.zeros_like(g) if (st["g_prev"] is None or k == 1) else g - st["g_prev"]
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["d"] = b2 * st["d"] + (1 - b2) * diff
                st["n"] = b3 * st["n"] + (1 - b3) * (g + b2 * diff) ** 2
                denom = st["n"].sqrt() / math.sqrt(1 - b3 ** k) + eps
                m = st["m"]
                if group["caution"]:
                    mask = (m * g > 0).to(m.dtype)
                    m = m * mask / max(float(mask.mean()), 1e-3)
                if group["no_prox"]:
                    theta.mul_(1 - lr * wd)
                theta.sub_(lr / (1 - b1 ** k) * m / denom + lr * b2 / (1 - b2 ** k) * st["d"] / denom)
                if not group["no_prox"]:
                    theta.div_(1 + lr * wd)
                st["g_prev"] = g

    def restart(self) -> None:
        for group in self.groups:
            group["k"] = 0
            for st in group["state"]:
                if st is not None:
                    st["m"].zero_(), st["d"].zero_(), st["n"].zero_()

    def params(self) -> List[List[Tensor]]:
        return [g["params"] for g in self.groups]
