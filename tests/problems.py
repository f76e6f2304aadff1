"""Randomized optimization problems shared by the equivalence tests.

A problem is a list of parameter groups (shapes + hyper-parameters) and a
fixed sequence of gradients, some ``None``, so that every implementation sees
exactly the same inputs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

SHAPES = [(), (1,), (7,), (3, 5), (0,), (2, 3, 4), (16, 33), (1, 1, 1), (129,)]


@dataclass
class Problem:
    groups: List[Dict]                      # hyper-parameters + "shapes"
    init: List[List[torch.Tensor]]          # fp64 initial parameters per group
    grads: List[List[List[Optional[torch.Tensor]]]] = field(default_factory=list)  # [step][group][param]
    max_grad_norm: float = 0.0


def make_problem(seed: int, steps: int = 60, *, clip: Optional[str] = None, caution: bool = False,
                 none_prob: float = 0.1, n_groups: int = 3, scalars: bool = True) -> Problem:
    """``clip``: None (off), "binding" (max norm well below the gradient norm) or "loose".

    ``scalars=False`` leaves out 0-dim parameters (mmpretrain's clip cannot
    broadcast into them).
    """
    shape_pool = SHAPES if scalars else [s for s in SHAPES if s != ()]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    groups, init = [], []
    for gi in range(n_groups):
        shapes = rng.sample(shape_pool, k=rng.randint(2, 5))
        groups.append(dict(
            shapes=shapes,
            lr=rng.choice([1e-3, 5e-3, 2e-2]),
            betas=rng.choice([(0.98, 0.92, 0.99), (0.9, 0.9, 0.999), (0.95, 0.8, 0.98)]),
            eps=rng.choice([1e-8, 1e-6]),
            weight_decay=rng.choice([0.0, 0.02, 0.1]) if gi else 0.05,
            no_prox=rng.random() < 0.5,
            caution=caution,
        ))
        init.append([torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes])
    numel = sum(t.numel() for ts in init for t in ts)
    max_grad_norm = {None: 0.0, "binding": 0.05 * numel ** 0.5, "loose": 1e6}[clip]
    prob = Problem(groups, init, max_grad_norm=max_grad_norm)
    for _ in range(steps):
        prob.grads.append([[None if rng.random() < none_prob else
                            torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ts]
                           for ts in init])
    return prob


def param_groups(prob: Problem, dtype=torch.float32, device="cpu", keys=None):
    """torch parameter groups for ``prob`` (fresh leaf tensors)."""
    keys = keys or ("lr", "betas", "eps", "weight_decay", "no_prox", "caution")
    out = []
    for g, ts in zip(prob.groups, prob.init):
        params = [torch.nn.Parameter(t.to(device=device, dtype=dtype).clone()) for t in ts]
        out.append({"params": params, **{k: g[k] for k in keys if k in g}})
    return out


def run_torch(opt, groups, grads_seq, dtype=torch.float32, steps=None):
    """Feed the fixed gradients to ``opt`` for ``steps`` steps (all by default)."""
    for grads in grads_seq[:steps]:
        for group, gs in zip(groups, grads):
            for p, g in zip(group["params"], gs):
                p.grad = None if g is None else g.to(device=p.device, dtype=dtype)
        opt.step()


def reference_groups(prob: Problem):
    return [{"params": ts, **{k: v for k, v in g.items() if k != "shapes"}} for g, ts in zip(prob.groups, prob.init)]
