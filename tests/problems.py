"""Randomized optimization problems shared by the equivalence tests.

A problem is a list of parameter groups (shapes + hyper-parameters) and a
fixed sequence of gradients, some ``None``, so that every implementation sees
exactly the same inputs.
"""
from __future__ import annotations

import copy
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


# ---------------------------------------------------------------- AMP loops (fused kernels: tests/test_fused.py,
# tests/test_triton.py and tests/test_lowmem.py run them on each kernel)
def snapshot(opt, groups):
    """Copies of the parameters, every state tensor and the groups' step counts."""
    params = [p.detach().clone() for g in groups for p in g["params"]]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
             for p, st in opt.state.items()}
    steps = [g["step"].clone() if torch.is_tensor(g.get("step")) else g.get("step") for g in opt.param_groups]
    return params, state, steps


def assert_bit_identical(a, b):
    (pa, sa, ka), (pb, sb, kb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), k
    assert [float(x) for x in ka] == [float(x) for x in kb]


def run_amp(opt, groups, grads_seq, skipped=(), grad_scale: Optional[float] = None, ref=None,
            bad: float = float("nan"), dtype=torch.float32):
    """Feed the fixed gradients as GradScaler does: multiplied by ``grad_scale`` (also handed to ``opt``
    when given) and with ``opt.found_inf`` set on every step (device-step mode).  Steps whose index is
    in ``skipped`` get gradients full of ``bad`` and ``found_inf = 1``; the others are also taken by
    ``ref`` (a float64 reference, unscaled gradients) when given."""
    for k, grads in enumerate(grads_seq):
        skip = k in skipped
        for group, gs in zip(groups, grads):
            for p, g in zip(group["params"], gs):
                p.grad = None if g is None else (torch.full_like(p, bad) if skip else
                                                 (g * (grad_scale or 1.0)).to(device=p.device, dtype=dtype))
        if grad_scale is not None:
            opt.grad_scale = torch.tensor(float(grad_scale))
        opt.found_inf = torch.tensor(1.0 if skip else 0.0)
        opt.step()
        if ref is not None and not skip:
            ref.step(grads)


def assert_skipped_steps_change_nothing(opt, groups, grads_seq, warmup: int, dtype=torch.float32):
    """``warmup`` plain steps, one AMP step (into device-step mode), then the remaining steps skipped
    (found_inf = 1, infinite gradients at a large scale): parameters, states and step counts must be
    bit-identical to what they were before the skipped steps."""
    run_torch(opt, groups, grads_seq[:warmup], dtype=dtype)
    run_amp(opt, groups, grads_seq[warmup:warmup + 1], dtype=dtype)
    before = snapshot(opt, groups)
    rest = grads_seq[warmup + 1:]
    assert rest, "no step left to skip"
    run_amp(opt, groups, rest, skipped=range(len(rest)), grad_scale=65536.0, bad=float("inf"), dtype=dtype)
    assert_bit_identical(before, snapshot(opt, groups))


def run_grad_scaler(model, twin, opt, plain, x, y, iters: int, overflow_at: int, around_step=None):
    """``iters`` GradScaler iterations of an MSE fit of ``model`` with ``opt``; on iteration
    ``overflow_at`` one gradient is made infinite, so GradScaler must skip that step.  ``twin`` (a copy of
    the model) takes the same iterations but the skipped one with ``plain``, without a scaler.
    ``around_step``: a context manager factory wrapped around ``scaler.step`` (e.g. one refusing host
    reads).  Returns the scaler."""
    from contextlib import nullcontext
    mse = torch.nn.functional.mse_loss
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    for it in range(iters):
        scaler.scale(mse(model(x), y)).backward()
        if it == overflow_at:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        with (around_step or nullcontext)():
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if it != overflow_at:
            mse(twin(x), y).backward()
            plain.step()
            plain.zero_grad()
    return scaler


def stepped_copy(opt, grads, op=None):
    """A deep copy of ``opt`` stepped once with ``grads`` (one per parameter of its first group, moved to
    the parameter's device and dtype), through the fused op ``op`` in place of ``fused_adan_`` if given."""
    o = copy.deepcopy(opt)
    for p, g in zip(o.param_groups[0]["params"], grads):
        p.grad = g.to(p.device, p.dtype)
    saved = torch.ops.adan_plugin.fused_adan_
    if op is not None:
        torch.ops.adan_plugin.fused_adan_ = op
    try:
        o.step()
    finally:
        torch.ops.adan_plugin.fused_adan_ = saved
    return o
