"""Every unfused path against the float64 Algorithm-1 reference."""
import pytest
import torch

from adan_plugin import Adan
from problems import make_problem, param_groups, reference_groups, run_torch
from reference import RefAdan

PATHS = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False)}


def _compare(prob, path, dtype=torch.float32, rtol=2e-5, atol=2e-6, **extra):
    ref = RefAdan(reference_groups(prob), max_grad_norm=prob.max_grad_norm)
    for grads in prob.grads:
        ref.step(grads)
    groups = param_groups(prob, dtype=dtype)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **PATHS[path], **extra)
    run_torch(opt, groups, prob.grads, dtype=dtype)
    for ours, theirs in zip(groups, ref.params()):
        for p, r in zip(ours["params"], theirs):
            torch.testing.assert_close(p.detach().double(), r, rtol=rtol, atol=atol)
    return opt, groups, ref


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("clip", [None, "binding", "loose"])
def test_matches_reference(path, seed, clip):
    prob = make_problem(seed, steps=60, clip=clip)
    _compare(prob, path)


@pytest.mark.parametrize("path", PATHS)
def test_caution_matches_reference(path):
    _compare(make_problem(11, steps=50, caution=True, clip="binding"), path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.03), (torch.float16, 4e-3)])
def test_low_precision_params_track_reference(path, dtype, tol):
    # Unfused math runs in fp32 for 16-bit parameters, as the fused kernels do: only
    # the storage rounds.  fp16 parameters keep fp32 states (fp16 states overflow).
    prob = make_problem(3, steps=20, none_prob=0.0, n_groups=1)
    opt, groups, _ = _compare(prob, path, dtype=dtype, rtol=tol, atol=tol)
    state_dtype = torch.float32 if dtype == torch.float16 else dtype
    for p in groups[0]["params"]:
        assert p.dtype == dtype
        assert all(t.dtype == state_dtype for t in opt.state[p].values())


@pytest.mark.parametrize("path", PATHS)
def test_restart_matches_reference(path):
    prob = make_problem(5, steps=40, clip="binding")
    ref = RefAdan(reference_groups(prob), max_grad_norm=prob.max_grad_norm)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **PATHS[path])
    run_torch(opt, groups, prob.grads[:20])
    for grads in prob.grads[:20]:
        ref.step(grads)
    opt.restart_opt()
    ref.restart()
    assert all(g["step"] == 0 for g in opt.param_groups)
    run_torch(opt, groups, prob.grads[20:])
    for grads in prob.grads[20:]:
        ref.step(grads)
    for ours, theirs in zip(groups, ref.params()):
        for p, r in zip(ours["params"], theirs):
            torch.testing.assert_close(p.detach().double(), r, rtol=2e-5, atol=2e-6)


def test_single_and_foreach_agree_closely():
    prob = make_problem(7, steps=60, clip="binding")
    results = []
    for path in PATHS:
        groups = param_groups(prob)
        run_torch(Adan(groups, max_grad_norm=prob.max_grad_norm, **PATHS[path]), groups, prob.grads)
        results.append([p.detach() for g in groups for p in g["params"]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
def test_complex_params_follow_real_view(path):
    # A complex parameter is optimized as its real view, as torch.optim does.
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, dtype=torch.complex64, generator=gen)
    grads = [torch.randn(6, dtype=torch.complex64, generator=gen) for _ in range(10)]
    zc = torch.nn.Parameter(z0.clone())
    zr = torch.nn.Parameter(torch.view_as_real(z0).clone())
    oc = Adan([zc], lr=1e-2, weight_decay=0.02, **PATHS[path])
    orr = Adan([zr], lr=1e-2, weight_decay=0.02, **PATHS[path])
    for g in grads:
        zc.grad, zr.grad = g.clone(), torch.view_as_real(g).clone()
        oc.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(zc.detach()), zr.detach())
