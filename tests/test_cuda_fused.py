"""The fused CUDA kernels.  Marked ``cuda``: skipped without a GPU.

Run them on a GPU machine with ``tools/gpu_checks.sh`` (this suite, then
compute-sanitizer memcheck on a short run).
"""
import copy

import pytest
import torch

from adan_plugin import Adan, _ext
from adan_plugin.functional import STATE_KEYS
from adan_plugin.fused import _fused_adan
from cuda_graphs import capture_step, grad_scaler_steps_without_sync, step_peak_bytes
from problems import make_problem, param_groups, reference_groups, run_torch
from reference import RefAdan

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (_ext.extension_loaded() and _ext.fused_supported(torch.device("cuda"))),
                                 reason="adan_plugin._C was built without CUDA kernels")]


def _reference(prob):
    ref = RefAdan(reference_groups(prob), max_grad_norm=prob.max_grad_norm)
    for grads in prob.grads:
        ref.step(grads)
    return ref


def _assert_tracks(groups, ref, rtol, atol):
    for ours, theirs in zip(groups, ref.params()):
        for p, r in zip(ours["params"], theirs):
            torch.testing.assert_close(p.detach().double().cpu(), r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("clip", [None, "binding"])
def test_cuda_fused_matches_reference_cpu_fused_and_foreach(seed, clip):
    prob = make_problem(seed, steps=40, clip=clip)
    ref = _reference(prob)
    out = {}
    for name, device, kw in [("cuda_fused", "cuda", dict(fused=True)), ("cpu_fused", "cpu", dict(fused=True)),
                             ("cuda_foreach", "cuda", dict(fused=False, foreach=True))]:
        groups = param_groups(prob, device=device)
        run_torch(Adan(groups, max_grad_norm=prob.max_grad_norm, **kw), groups, prob.grads)
        _assert_tracks(groups, ref, rtol=2e-5, atol=2e-6)
        out[name] = [p.detach().cpu() for g in groups for p in g["params"]]
    for a, b in zip(out["cuda_fused"], out["cpu_fused"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("param_dtype,state_dtype,tol", [
    (torch.bfloat16, None, 0.03), (torch.float16, None, 4e-3), (torch.float32, torch.bfloat16, 2e-3),
    (torch.bfloat16, torch.float32, 0.03)])
def test_cuda_dtypes(param_dtype, state_dtype, tol):
    prob = make_problem(4, steps=20, none_prob=0.1, n_groups=2, clip="binding")
    groups = param_groups(prob, dtype=param_dtype, device="cuda")
    opt = Adan(groups, fused=True, state_dtype=state_dtype, max_grad_norm=prob.max_grad_norm)
    run_torch(opt, groups, prob.grads, dtype=param_dtype)
    _assert_tracks(groups, _reference(prob), rtol=tol, atol=tol)
    # state_dtype=None: the parameter's dtype, except fp32 for fp16 parameters (fp16's range would
    # overflow exp_avg_sq), as documented on Adan
    default = torch.float32 if param_dtype == torch.float16 else param_dtype
    for st in opt.state.values():
        assert all(st[k].dtype == (state_dtype or default) for k in STATE_KEYS)


def test_cuda_many_tensors_span_several_launches():
    # More tensors than one launch holds, and a tensor whose chunks span launches.
    sizes = [0, 1, 3, 5, 17, 4099] * 200 + [65536 * 330 + 3]
    init = [torch.randn(s, dtype=torch.float64) for s in sizes]
    hp = dict(lr=2e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, no_prox=False)
    params = [torch.nn.Parameter(t.float().cuda()) for t in init]
    opt = Adan(params, fused=True, max_grad_norm=5.0, **hp)
    ref = RefAdan([dict(params=init, **hp)], max_grad_norm=5.0)
    for _ in range(3):
        grads = [torch.randn(s, dtype=torch.float64) for s in sizes]
        for p, g in zip(params, grads):
            p.grad = g.float().cuda()
        opt.step()
        ref.step([grads])
    for p, r in zip(params, ref.params()[0]):
        # fp32 vs float64 where tiny gradients make m/denom sensitive: 1e-5 absolute
        torch.testing.assert_close(p.detach().double().cpu(), r, rtol=2e-5, atol=1e-5)


def test_cuda_unaligned_views_take_the_scalar_path():
    tensors = [torch.randn(10001, device="cuda")[1:] for _ in range(6)]  # 4-byte offset: not 16-B aligned
    tensors[3].abs_()
    cpu = [t.cpu() for t in tensors]
    kw = dict(step=3, lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.1,
              no_prox=True, caution=False)
    _fused_adan(*[[t] for t in tensors], **kw)
    _fused_adan(*[[t] for t in cpu], **kw)
    for a, b in zip(tensors, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)


def test_cuda_tensor_over_2_pow_31_elements():
    # 64-bit indexing: fused Adam kernels elsewhere have crashed here.  bf16
    # keeps this at 6 x 4.3 GB; the update is checked at both ends.
    numel = 2 ** 31 + 1029
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with >= 40 GiB")
    p = torch.nn.Parameter(torch.zeros(numel, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
    p.grad[-1000:] = -2.0
    opt = Adan([p], lr=0.5, fused=True, state_dtype=torch.bfloat16)
    opt.step()
    # Step 1 with a constant gradient: diff = 0, m/denom = sign(g) (eps aside),
    # so every element moves by -lr * sign(g).
    torch.cuda.synchronize()
    # The last 1000 elements (from index 2^31 + 29) have gradient -2 and move up; the rest, including
    # the elements on both sides of index 2^31, move down.
    assert p[:1000].float().eq(-0.5).all() and p[2 ** 31 - 500:numel - 1000].float().eq(-0.5).all()
    assert p[-1000:].float().eq(0.5).all()
    neg = opt.state[p]["neg_pre_grad"]
    assert neg[-1].item() == 2.0 and neg[0].item() == -1.0
    del opt, p


def test_cuda_graph_capture_and_replay():
    prob = make_problem(12, steps=10, clip="binding", none_prob=0.0, n_groups=2)
    ref = _reference(prob)
    groups = param_groups(prob, device="cuda")
    for g in groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt = Adan(groups, fused=True, capturable=True, max_grad_norm=prob.max_grad_norm)
    static_grads = [p.grad for g in groups for p in g["params"]]

    def load(k):
        for dst, src in zip(static_grads, [g for gs in prob.grads[k] for g in gs]):
            dst.copy_(src)

    load(0)
    graph = capture_step(opt)
    for k in range(1, len(prob.grads)):
        load(k)
        graph.replay()
    torch.cuda.synchronize()
    _assert_tracks(groups, ref, rtol=2e-5, atol=2e-6)
    assert [float(g["step"]) for g in opt.param_groups] == [len(prob.grads)] * 2


def test_cuda_no_host_sync_with_clipping_and_grad_scaler():
    opt = grad_scaler_steps_without_sync(
        lambda params: Adan(params, lr=1e-2, fused=True, max_grad_norm=1.0, weight_decay=0.02))
    assert int(opt.param_groups[0]["step"]) >= 1


def test_cuda_found_inf_skips_on_device():
    prob = make_problem(9, steps=6, clip="binding", none_prob=0.0, n_groups=1)
    groups = param_groups(prob, device="cuda")
    opt = Adan(groups, fused=True, max_grad_norm=prob.max_grad_norm)
    opt.found_inf = torch.zeros((), device="cuda")
    run_torch(opt, groups, prob.grads[:3])
    before = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in groups[0]["params"]]))
    opt.found_inf = torch.ones((), device="cuda")
    opt.grad_scale = torch.full((), 65536.0, device="cuda")
    run_torch(opt, groups, prob.grads[3:])
    after = (opt.state_dict(), [p.detach() for p in groups[0]["params"]])
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    assert float(after[0]["param_groups"][0]["step"]) == 3.0
    for i, st in before[0]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after[0]["state"][i][k]), k


def test_cuda_step_allocates_no_parameter_sized_temporaries():
    params = [torch.nn.Parameter(torch.randn(4 * 2 ** 20, device="cuda")) for _ in range(8)]  # 128 MiB
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adan(params, fused=True, max_grad_norm=1.0)
    opt.step()  # creates the state
    assert step_peak_bytes(opt) < 2 ** 20
