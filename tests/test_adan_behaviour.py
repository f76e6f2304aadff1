"""Behaviour of the Adan class: grads untouched, resume, closure, AMP, state layout."""
import copy

import pytest
import torch

from adan_plugin import Adan
from adan_plugin.adan import STATE_KEYS
from problems import make_problem, param_groups, run_torch

PATHS = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False)}


def _snapshot(opt, groups):
    params = [p.detach().clone() for g in groups for p in g["params"]]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
             for p, st in opt.state.items()}
    return params, state, [g.get("step") for g in opt.param_groups]


def _assert_same(a, b):
    (pa, sa, ka), (pb, sb, kb) = a, b
    assert ka == kb
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]) if torch.is_tensor(sa[key][k]) else sa[key][k] == sb[key][k]


@pytest.mark.parametrize("path", PATHS)
def test_step_never_modifies_grads(path):
    prob = make_problem(1, steps=5, clip="binding", none_prob=0.0)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **PATHS[path])
    for grads in prob.grads:
        for group, gs in zip(groups, grads):
            for p, g in zip(group["params"], gs):
                p.grad = g.float()
        before = [p.grad.clone() for g in groups for p in g["params"]]
        opt.step()
        assert all(torch.equal(p.grad, b) for p, b in zip((p for g in groups for p in g["params"]), before))


@pytest.mark.parametrize("path", PATHS)
def test_resume_from_disk_is_bit_exact(path, tmp_path):
    prob = make_problem(2, steps=30, clip="binding")
    kw = dict(max_grad_norm=prob.max_grad_norm, **PATHS[path])
    straight = param_groups(prob)
    run_torch(Adan(straight, **kw), straight, prob.grads)

    resumed = param_groups(prob)
    opt = Adan(resumed, **kw)
    run_torch(opt, resumed, prob.grads[:13])
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for g in resumed for p in g["params"]]},
               tmp_path / "ckpt.pt")
    del opt
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = param_groups(prob)
    with torch.no_grad():
        for p, saved in zip((p for g in fresh for p in g["params"]), ckpt["params"]):
            p.copy_(saved)
    opt = Adan(fresh, **kw)
    opt.load_state_dict(ckpt["opt"])
    run_torch(opt, fresh, prob.grads[13:])
    for a, b in zip((p for g in straight for p in g["params"]), (p for g in fresh for p in g["params"])):
        assert torch.equal(a, b)


def test_state_layout_matches_official():
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(torch.randn(2))  # never gets a gradient
    opt = Adan([p, q], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn(4, 3)
        opt.step()
    assert set(opt.state[p]) == set(STATE_KEYS)
    assert q not in opt.state
    assert opt.param_groups[0]["step"] == 3 and isinstance(opt.param_groups[0]["step"], int)
    torch.testing.assert_close(opt.state[p]["neg_pre_grad"], -p.grad)


@pytest.mark.parametrize("path", PATHS)
def test_closure_is_evaluated_with_grad(path):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x = torch.randn(32, 5)
    y = x @ torch.randn(5, 1) + 0.01 * torch.randn(32, 1)
    opt = Adan(model.parameters(), lr=0.05, **PATHS[path])

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    losses = [opt.step(closure).item() for _ in range(30)]
    assert losses[0] == pytest.approx(first)
    assert losses[-1] < 0.5 * first


@pytest.mark.parametrize("path", PATHS)
def test_grad_scaler_matches_unscaled_and_skips_inf(path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 8), torch.randn(16, 3)
    opt = Adan(model.parameters(), lr=1e-2, max_grad_norm=0.5, **PATHS[path])
    opt_twin = Adan(twin.parameters(), lr=1e-2, max_grad_norm=0.5, **PATHS[path])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(5):
        for m, o, s in ((model, opt, scaler), (twin, opt_twin, None)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            if s is None:
                loss.backward()
                o.step()
            else:
                s.scale(loss).backward()
                s.step(o)
                s.update()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # An overflowing gradient: the scaler skips the step and Adan loses nothing.
    before = _snapshot(opt, [{"params": list(model.parameters())}])
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    _assert_same(before, _snapshot(opt, [{"params": list(model.parameters())}]))


def test_default_path_is_single_tensor_on_cpu():
    from adan_plugin.functional import _single_tensor_adan
    p = torch.nn.Parameter(torch.randn(3))
    opt = Adan([p], fused=False)
    assert opt._resolve_impl(opt.param_groups[0], [p]) is _single_tensor_adan
