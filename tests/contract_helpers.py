"""Shared by the optimizer-contract tests: a trained optimizer and a bit-exact snapshot of everything it holds."""
import copy

import torch

from adan_plugin import Adan, _ext

PATHS = {"single": dict(fused=False, foreach=False), "foreach": dict(fused=False, foreach=True)}
if _ext.extension_loaded():
    PATHS["fused"] = dict(fused=True)


def trained(steps=3, seed=0, **kw):
    """An optimizer over two groups (a matrix and a vector, a 4-d and a 0-d parameter) after ``steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (5,), (2, 3, 2, 2), ()]]
    opt = Adan([{"params": params[:2]}, {"params": params[2:], "lr": 2e-3}], lr=1e-2, weight_decay=0.02, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params


def _clone(v):
    if torch.is_tensor(v):
        return v.detach().clone()
    return copy.deepcopy(v)


def snapshot(opt):
    """Parameters, states and group settings (everything but the parameter objects), cloned."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: _clone(v) for k, v in st.items()} for p, st in opt.state.items()}
    groups = [{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return params, state, groups


def _equal_tensors(a, b):
    if not (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device):
        return False
    if a.device.type == "meta":
        return True  # no values to compare
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())  # bit-exact, NaN where NaN was
    return torch.equal(a, b)


def _same(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return _equal_tensors(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b or (a != a and b != b)


def assert_unchanged(before, after):
    (pa, sa, ga), (pb, sb, gb) = before, after
    assert len(pa) == len(pb) and all(_equal_tensors(x, y) for x, y in zip(pa, pb)), "parameters changed"
    assert _same(sa, sb), "optimizer state changed"
    assert _same(ga, gb), "param_groups changed"
