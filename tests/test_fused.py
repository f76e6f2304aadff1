"""The fused CPU kernels (adan_plugin._C) against the float64 reference and the unfused paths.

Tests taking the ``kernel`` fixture run twice: with the CPU kernel, and with the CUDA kernel's own code
(csrc/adan_cuda_block.h: launch plan, alignment choice, vector and scalar loops, device scalars) run on
CPU tensors through the test op ``_fused_adan_cuda_code_on_cpu_``, so its logic is checked without a GPU."""
import copy
import os
import platform
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from adan_plugin import Adan, FusedAdan, _ext
from adan_plugin.fused import _fused_adan
from adan_plugin.functional import STATE_KEYS, _single_tensor_adan
from problems import (assert_skipped_steps_change_nothing, make_problem, param_groups, reference_groups,
                      run_amp, run_grad_scaler, run_torch)
from q8_spec import threshold_spec
from reference import RefAdan

pytestmark = pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")


def _reference(prob, steps=None):
    ref = RefAdan(reference_groups(prob), max_grad_norm=prob.max_grad_norm)
    for grads in prob.grads[:steps]:
        ref.step(grads)
    return ref


def _assert_tracks(groups, ref, rtol, atol):
    for ours, theirs in zip(groups, ref.params()):
        for p, r in zip(ours["params"], theirs):
            torch.testing.assert_close(p.detach().double(), r, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("clip", [None, "binding"])
def test_fused_matches_reference_and_unfused(seed, clip, kernel):
    prob = make_problem(seed, steps=40, clip=clip)
    ref = _reference(prob)
    if clip == "binding":  # the coefficient really scales: max norm far below the gradient norm
        numel = sum(t.numel() for ts in prob.init for t in ts)
        assert prob.max_grad_norm < 0.1 * numel ** 0.5
    results = {}
    for name, kw in {"fused": dict(fused=True), "single": dict(fused=False, foreach=False),
                     "foreach": dict(fused=False, foreach=True)}.items():
        groups = param_groups(prob)
        run_torch(Adan(groups, max_grad_norm=prob.max_grad_norm, **kw), groups, prob.grads)
        _assert_tracks(groups, ref, rtol=2e-5, atol=2e-6)
        results[name] = [p.detach() for g in groups for p in g["params"]]
    for a, b in zip(results["fused"], results["single"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.03), (torch.float16, 4e-3)])
def test_low_precision_params(dtype, tol, kernel):
    # fp32 math, only the storage rounds: closer to the reference than the
    # unfused paths (which compute in the parameter's dtype).
    prob = make_problem(3, steps=20, none_prob=0.0, n_groups=1)
    groups = param_groups(prob, dtype=dtype)
    opt = Adan(groups, fused=True)
    run_torch(opt, groups, prob.grads, dtype=dtype)
    _assert_tracks(groups, _reference(prob), rtol=tol, atol=tol)
    state_dtype = torch.float32 if dtype == torch.float16 else dtype  # fp16 states would overflow
    for p in groups[0]["params"]:
        assert all(opt.state[p][k].dtype == state_dtype for k in STATE_KEYS)


@pytest.mark.parametrize("param_dtype,state_dtype,tol", [
    (torch.float32, torch.bfloat16, 2e-3), (torch.bfloat16, torch.float32, 0.03),
    (torch.float16, torch.bfloat16, 5e-3), (torch.float16, torch.float32, 4e-3)])
def test_state_dtype(param_dtype, state_dtype, tol, kernel):
    prob = make_problem(4, steps=20, none_prob=0.1, n_groups=2, clip="binding")
    groups = param_groups(prob, dtype=param_dtype)
    opt = Adan(groups, fused=True, state_dtype=state_dtype, max_grad_norm=prob.max_grad_norm)
    run_torch(opt, groups, prob.grads, dtype=param_dtype)
    _assert_tracks(groups, _reference(prob), rtol=tol, atol=tol)
    for st in opt.state.values():
        assert all(st[k].dtype == state_dtype for k in STATE_KEYS)


def test_bf16_state_is_not_fp32_state():
    # The previous test's tolerance must not hide a state_dtype that is ignored.
    prob = make_problem(4, steps=20, none_prob=0.0, n_groups=1)
    out = []
    for sd in (None, torch.bfloat16):
        groups = param_groups(prob)
        run_torch(Adan(groups, fused=True, state_dtype=sd), groups, prob.grads)
        out.append(torch.cat([p.detach().flatten() for p in groups[0]["params"]]))
    assert not torch.equal(out[0], out[1])


def test_many_tensors_and_odd_sizes(kernel):
    # > 1000 tensors, sizes 0, 1, odd, around the vector width and over a chunk.
    rng = random.Random(0)
    sizes = [rng.choice([0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 127]) for _ in range(1100)] + [16384 * 2 + 5]
    init = [torch.randn(s, dtype=torch.float64) for s in sizes]
    hp = dict(lr=2e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, no_prox=True)
    params = [torch.nn.Parameter(t.float()) for t in init]
    opt = Adan(params, fused=True, max_grad_norm=3.0, **hp)
    ref = RefAdan([dict(params=init, **hp)], max_grad_norm=3.0)
    for _ in range(4):
        grads = [torch.randn(s, dtype=torch.float64) for s in sizes]
        for p, g in zip(params, grads):
            p.grad = g.float()
        opt.step()
        ref.step([grads])
    for p, r in zip(params, ref.params()[0]):
        torch.testing.assert_close(p.detach().double(), r, rtol=2e-5, atol=2e-6)


def test_restart_and_late_parameters_match_reference(kernel):
    prob = make_problem(5, steps=30, clip="binding", none_prob=0.3)
    ref = RefAdan(reference_groups(prob), max_grad_norm=prob.max_grad_norm)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, fused=True)
    run_torch(opt, groups, prob.grads[:15])
    for grads in prob.grads[:15]:
        ref.step(grads)
    opt.restart_opt()
    ref.restart()
    run_torch(opt, groups, prob.grads[15:])
    for grads in prob.grads[15:]:
        ref.step(grads)
    _assert_tracks(groups, ref, rtol=2e-5, atol=2e-6)


def test_gradient_is_never_written(kernel):
    params = [torch.nn.Parameter(torch.randn(1000))]
    opt = Adan(params, fused=True, max_grad_norm=0.1)
    for _ in range(3):
        g = torch.randn(1000)
        params[0].grad = g.clone()
        opt.step()
        assert torch.equal(params[0].grad, g)


# ---------------------------------------------------------------- AMP inputs
def _amp_problem(seed=7):
    prob = make_problem(seed, steps=12, clip="binding", none_prob=0.2, n_groups=2)
    return prob, param_groups(prob)


def test_grad_scale_unscales_in_registers(kernel):
    # A power-of-two scale is exact in fp32, so the trajectory is bit-identical.
    prob, plain = _amp_problem()
    _, scaled = _amp_problem()
    opt_a = Adan(plain, fused=True, max_grad_norm=prob.max_grad_norm)
    opt_b = Adan(scaled, fused=True, max_grad_norm=prob.max_grad_norm)
    for grads in prob.grads:
        run_torch(opt_a, plain, [grads])
        for group, gs in zip(scaled, grads):
            for p, g in zip(group["params"], gs):
                p.grad = None if g is None else (g * 1024).float()
        opt_b.grad_scale = torch.tensor(1024.0)
        opt_b.found_inf = torch.tensor(0.0)
        opt_b.step()
    for ga, gb in zip(plain, scaled):
        for a, b in zip(ga["params"], gb["params"]):
            assert torch.equal(a, b)
    # Device-step mode (found_inf given) and host mode count the same steps.
    assert [int(g["step"]) for g in opt_b.param_groups] == [g["step"] for g in opt_a.param_groups]


def test_found_inf_leaves_everything_untouched(kernel):
    prob, groups = _amp_problem()
    opt = Adan(groups, fused=True, max_grad_norm=prob.max_grad_norm)
    assert_skipped_steps_change_nothing(opt, groups, prob.grads[:8], warmup=4)


def test_skipped_first_steps_and_late_parameters_match_reference(kernel):
    # GradScaler often skips the very first steps, and some parameters get
    # their first gradient late (even on a skipped step): each parameter's
    # first applied step must still see a zero gradient difference.
    prob = make_problem(9, steps=14, clip="binding", none_prob=0.0, n_groups=2)
    late = prob.grads[0][1][0]
    assert late is not None
    for k in range(6):  # group 1, param 0 has no gradient for the first 6 steps
        prob.grads[k][1][0] = None
    for k in range(13):  # group 0, param 0 gets its first gradient on the last, skipped, step
        prob.grads[k][0][0] = None
    skipped = {0, 1, 5, 9, 13}  # step 5: the late parameter's first gradient is skipped
    ref = RefAdan(reference_groups(prob), max_grad_norm=prob.max_grad_norm)
    groups = param_groups(prob)
    opt = Adan(groups, fused=True, max_grad_norm=prob.max_grad_norm)
    run_amp(opt, groups, prob.grads, skipped=skipped, ref=ref)
    _assert_tracks(groups, ref, rtol=2e-5, atol=2e-6)
    assert [float(g["step"]) for g in opt.param_groups] == [len(prob.grads) - len(skipped)] * 2
    # Without AMP afterwards the group keeps counting on the device, so group 0's
    # param 0, whose only gradient so far was skipped, still takes a first step.
    del opt.found_inf
    for _ in range(3):
        grads = [[torch.randn(p.shape, dtype=torch.float64) for p in group["params"]] for group in groups]
        run_torch(opt, groups, [grads])
        ref.step(grads)
    _assert_tracks(groups, ref, rtol=2e-5, atol=2e-6)
    assert [float(g["step"]) for g in opt.param_groups] == [len(prob.grads) - len(skipped) + 3] * 2


def test_grad_scaler_step_uses_the_kernel_path(kernel):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin = copy.deepcopy(model)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    opt = Adan(model.parameters(), lr=1e-2, fused=True, max_grad_norm=0.5)
    opt_plain = Adan(twin.parameters(), lr=1e-2, fused=True, max_grad_norm=0.5)
    assert opt._step_supports_amp_scaling
    scaler = run_grad_scaler(model, twin, opt, opt_plain, x, y, iters=6, overflow_at=3)
    assert scaler.get_scale() == 2.0 ** 9  # the overflow was seen and backed off
    assert int(opt.param_groups[0]["step"]) == 5 == opt_plain.param_groups[0]["step"]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not hasattr(opt, "found_inf")  # GradScaler cleaned up after itself


# ---------------------------------------------------------------- torch.compile
def test_torch_compile_traces_the_fused_step():
    prob = make_problem(2, steps=4, clip="binding", none_prob=0.0, n_groups=1)
    groups = param_groups(prob)
    opt = Adan(groups, fused=True, max_grad_norm=prob.max_grad_norm)
    compiled = torch.compile(opt.step)
    for grads in prob.grads:
        for p, g in zip(groups[0]["params"], grads[0]):
            p.grad = g.float()
        compiled()
    _assert_tracks(groups, _reference(prob), rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- checkpoints
def test_bf16_state_survives_checkpoint_and_exchanges_with_unfused():
    prob = make_problem(6, steps=10, none_prob=0.0, n_groups=1)
    groups = param_groups(prob)
    opt = Adan(groups, fused=True, state_dtype=torch.bfloat16)
    run_torch(opt, groups, prob.grads[:5])
    sd = copy.deepcopy(opt.state_dict())
    # Our fused optimizer keeps bf16 states through torch's cast-to-param-dtype.
    groups2 = param_groups(prob)
    for p, q in zip(groups[0]["params"], groups2[0]["params"]):
        q.data.copy_(p.data)
    opt2 = Adan(groups2, fused=True, state_dtype=torch.bfloat16)
    opt2.load_state_dict(sd)
    assert all(st[k].dtype == torch.bfloat16 for st in opt2.state.values() for k in STATE_KEYS)
    # An unfused optimizer keeps its own path and gets fp32 states (torch upcasts them).
    groups3 = param_groups(prob)
    for p, q in zip(groups[0]["params"], groups3[0]["params"]):
        q.data.copy_(p.data)
    opt3 = Adan(groups3, fused=False)
    opt3.load_state_dict(sd)
    assert opt3.param_groups[0]["fused"] is False and opt3.param_groups[0]["state_dtype"] is None
    assert all(st[k].dtype == torch.float32 for st in opt3.state.values() for k in STATE_KEYS)
    # So does timm's Adan.
    timm_optim = pytest.importorskip("timm.optim")
    theirs = timm_optim.Adan([torch.nn.Parameter(p.detach().clone()) for p in groups[0]["params"]])
    theirs.load_state_dict(copy.deepcopy(sd))
    assert all(st[k].dtype == torch.float32 for st in theirs.state.values() for k in STATE_KEYS)
    run_torch(opt, groups, prob.grads[5:])
    run_torch(opt2, groups2, prob.grads[5:])
    run_torch(opt3, groups3, prob.grads[5:])
    for a, b, c in zip(groups[0]["params"], groups2[0]["params"], groups3[0]["params"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-3)


def test_fused_checkpoint_resumes_on_unfused_path():
    prob = make_problem(8, steps=16, clip="binding")
    ref = _reference(prob)
    groups = param_groups(prob)
    opt = Adan(groups, fused=True, max_grad_norm=prob.max_grad_norm)
    run_torch(opt, groups, prob.grads[:8])
    opt_b = Adan(groups, fused=False, max_grad_norm=prob.max_grad_norm)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    run_torch(opt_b, groups, prob.grads[8:])
    _assert_tracks(groups, ref, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- resolution and errors
def test_fused_none_picks_kernels_when_built():
    p = torch.nn.Parameter(torch.randn(3))
    assert Adan([p])._uses_fused(Adan([p]).param_groups[0])
    assert not Adan([p], caution=True)._step_supports_amp_scaling  # caution: unfused
    assert not Adan([p], foreach=True)._step_supports_amp_scaling
    assert FusedAdan([p]).param_groups[0]["fused"] is True


def test_fused_true_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_load_error", ImportError("no _C"))
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e"):
        Adan([p], fused=True)
    with pytest.raises(RuntimeError, match="compiled extension"):
        Adan([p], state_dtype=torch.bfloat16)
    # fused=None falls back to an unfused path, and GradScaler unscales itself.
    opt = Adan([p])
    assert not opt._step_supports_amp_scaling
    p.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["step"] == 1 and opt.state[p]["neg_pre_grad"].dtype == torch.float32


@pytest.mark.parametrize("kwargs,match", [
    (dict(fused=True, caution=True), "caution"),
    (dict(state_dtype=torch.bfloat16, caution=True), "caution"),
    (dict(state_dtype="8bit", caution=True), r"caution=True .*; state_dtype needs them$"),
    (dict(fused=False, state_dtype=torch.bfloat16), "needs? the fused kernels"),
    (dict(fused=False, capturable=True), "needs? the fused kernels"),
    (dict(foreach=True, state_dtype=torch.bfloat16), "needs? the fused kernels"),
    (dict(fused=True, state_dtype=torch.float64), "state_dtype must be one of"),
])
def test_bad_fused_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adan([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_unsupported_dtype_is_refused_and_meta_is_built_then_refused_at_step():
    with pytest.raises(RuntimeError, match="dtype torch.float64"):
        Adan([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], fused=True)
    # As torch's fused optimizers: build on meta; a step on meta is refused before any write.
    model = torch.nn.Linear(3, 2, device="meta")
    opt = Adan(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params"):
        opt.step()
    assert not opt.state and "step" not in opt.param_groups[0]
    # torch's generic test goes on with zero_grad(), to_empty() and a step: a no-op, not an error (with a
    # warning naming the likely mistake: tests/test_adan_errors.py).
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    with pytest.warns(UserWarning, match="is on the meta device"):
        opt.step()
    assert not opt.state


def test_op_rejects_mismatched_lists_and_changes_nothing():
    p, g = torch.randn(8), torch.randn(8)
    m, n, d, neg = (torch.zeros(8) for _ in range(4))
    kw = dict(step=1, lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.0,
              no_prox=False, caution=False)
    p0 = p.clone()
    with pytest.raises(RuntimeError, match="expected Float"):
        _fused_adan([p], [g], [m], [n], [d], [neg.double()], **kw)
    with pytest.raises(RuntimeError, match="has sizes"):
        _fused_adan([p], [g], [m], [n], [d.view(2, 4)], [neg], **kw)
    with pytest.raises(RuntimeError, match="states must be float32, bfloat16 or float16"):
        _fused_adan([p], [g], [m.int()], [n.int()], [d.int()], [neg.int()], **kw)
    with pytest.raises(ValueError, match="caution"):
        _fused_adan([p], [g], [m], [n], [d], [neg], **{**kw, "caution": True})
    assert torch.equal(p, p0) and not m.any()


def test_op_matches_single_tensor_on_strided_views(kernel):
    # Non-contiguous but dense tensors (channels_last) and offset views.
    base = [torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last) for _ in range(6)]
    views = [torch.randn(1001)[1:] for _ in range(6)]
    for tensors in (base, views):
        a = [t.clone(memory_format=torch.preserve_format) if t.dim() > 1 else t for t in tensors]
        b = [t.clone(memory_format=torch.preserve_format) for t in tensors]
        a[3].abs_(), b[3].abs_()  # exp_avg_sq >= 0
        kw = dict(step=3, lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.1,
                  no_prox=False, caution=False)
        _fused_adan(*[[t] for t in a], **kw)
        _single_tensor_adan(*[[t] for t in b], **kw)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


OP_KW = dict(lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.05, no_prox=False, first=False,
             param_steps=[], exp_avg_scales=[], exp_avg_sq_scales=[], exp_avg_diff_scales=[],
             neg_pre_grad_scales=[], kahan_comps=[])


def _op_lists(sizes, param_dtype, state_dtype, make):
    """The op's six lists (params, grads, exp_avg, exp_avg_sq, exp_avg_diff, neg_pre_grad), each tensor
    ``make(index, numel, dtype)`` filled with randn; exp_avg_sq made non-negative."""
    lists = []
    for k in range(6):
        dtype = param_dtype if k < 2 else state_dtype
        ts = [make(i, n, dtype) for i, n in enumerate(sizes)]
        for t in ts:
            t.copy_(torch.randn(t.shape))
            if k == 3:
                t.abs_()
        lists.append(ts)
    return lists


def offset_views(unaligned):
    """A ``make`` for ``_op_lists``: tensor i is a view one element into its buffer (not vector-aligned)
    where ``unaligned(i)``, else a fresh tensor."""
    def make(i, n, dtype):
        return torch.empty(n + 1, dtype=dtype)[1:] if unaligned(i) else torch.empty(n, dtype=dtype)
    return make


def test_cuda_kernel_code_across_launches_matches_the_cpu_kernel():
    # A tensor spilling out of a full launch (320 chunks of 65536), more tensors than a launch has
    # slots, aligned (vector loop) and 4-byte-offset (scalar loop) tensors in one call, bf16 states.
    ops = torch.ops.adan_plugin
    chunk, blocks = 65536, 320
    sizes = [chunk * blocks + 5, 3, chunk + 1] + [7, 4099, 1] * 12
    make = offset_views(lambda i: i % 4 == 2)
    for state_dtype in (torch.float32, torch.bfloat16):
        lists = _op_lists(sizes, torch.float32, state_dtype, make)
        kw = dict(OP_KW, step=3.0, grad_coef=torch.tensor(0.5))
        ours = [[t.clone() for t in ts] for ts in lists]
        ops._fused_adan_cuda_code_on_cpu_(*ours, **kw)
        ops.fused_adan_(*lists, **kw)
        # The CPU kernel's AVX2 loop contracts to FMA, this build of the CUDA code does not (a GPU does):
        # a few elements differ by an fp32 ulp, which a bf16 state can carry into one bf16 ulp.
        for a, b in zip(ours, lists):
            for x, y in zip(a, b):
                tol = dict(rtol=1e-5, atol=1e-6) if x.dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
                torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                     (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_both_kernels_write_only_inside_their_tensors(param_dtype, state_dtype):
    # Each tensor is a window into a larger buffer whose margins hold a sentinel; sizes straddle the
    # 4-wide loop, the CPU vector width and the CUDA chunk, windows start aligned (margin 8) or not (5).
    ops = torch.ops.adan_plugin
    sizes = [1, 3, 4, 5, 17, 65535, 65536, 65537, 300001]
    for op in (ops.fused_adan_, ops._fused_adan_cuda_code_on_cpu_):
        for margin in (5, 8):
            buffers = []

            def make(i, n, dtype):
                buffers.append((torch.full((n + 2 * margin,), -7.0, dtype=dtype), n))
                return buffers[-1][0][margin:margin + n]

            op(*_op_lists(sizes, param_dtype, state_dtype, make), **OP_KW, step=2.0)
            for b, n in buffers:
                assert (b[:margin] == -7.0).all() and (b[margin + n:] == -7.0).all(), (op, margin, n)


# ---------------------------------------------------------------- CPU builds (csrc/adan_cpu*.cpp)
CPU_ISAS = ("base", "avx2", "avx512", "avx512_bf16")  # weakest first, as in csrc/adan_cpu.cpp


def _cpu_isas_here():
    """The builds this CPU can run, from the kernel's flags in /proc/cpuinfo (not from the extension)."""
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    isas = ["base"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= flags:
        isas.append("avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            isas.append("avx512")
            if "avx512_bf16" in flags:
                isas.append("avx512_bf16")
    return isas


def _run_python(code_or_args, isa, **kwargs):
    env = dict(os.environ)
    env.pop("ADAN_PLUGIN_CPU_ISA", None)
    if isa is not None:
        env["ADAN_PLUGIN_CPU_ISA"] = isa
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), **kwargs)


def test_cpu_builds_agree(tmp_path):
    # Every build this CPU can run, forced in turn, on every param/state dtype pair, sizes around the vector
    # widths and the chunk, aligned and unaligned windows: the vector builds agree bit for bit (same fp32 math
    # and FMA contraction, conversions that round to nearest even; AVX512-BF16 differs from the integer
    # rounding only on subnormals, which these inputs do not produce), the portable one (no FMA) to rounding;
    # none writes outside its tensors.  The best build is checked against the float64 reference above.
    isas = _cpu_isas_here()
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_isa_run.py")
    runs = {}
    for isa in isas:
        out = tmp_path / f"{isa}.pt"
        proc = _run_python([worker, str(out)], isa)
        assert proc.returncode == 0, proc.stderr
        runs[isa] = torch.load(out)
        assert runs[isa]["isa"] == isa
    for isa, run in runs.items():
        tail, sentinel = run["tail"], run["sentinel"]
        for (pd, sd, offset), buffers in run["results"].items():
            for buf in buffers:
                assert (buf[:offset] == sentinel).all() and (buf[-tail:] == sentinel).all(), (isa, pd, sd, offset)
                assert torch.isfinite(buf).all()
    best = runs[isas[-1]]["results"]
    for isa in isas[:-1]:
        for key, buffers in runs[isa]["results"].items():
            for i, (a, b) in enumerate(zip(buffers, best[key])):
                if isa != "base":
                    assert torch.equal(a, b), (isa, isas[-1], key, i, (a.float() - b.float()).abs().max())
                elif key[1] == "torch.float32":  # fp32 state: an fp32 ulp, one 16-bit ulp for 16-bit params
                    torch.testing.assert_close(a, b)
                else:  # a 16-bit state turns an ulp into a 16-bit ulp, which moves p by that fraction of lr
                    torch.testing.assert_close(a, b, rtol=8e-3, atol=2e-4)
    # 8-bit states (and Kahan buffers): the quantizer is exact by definition (adan_quant.h), so the vector
    # builds agree bit for bit on codes, scales and parameters too.  The portable build's rounding can move a
    # value across a level's threshold in the first step, and the second step carries that level into the
    # states computed from it (several of the denser small levels of another state): codes within one level
    # on 99% of the elements, parameters to the change of a dequantized state (p ~ N(0,1), lr 1e-2).
    code_sentinel = runs[isas[-1]]["code_sentinel"]
    for isa, run in runs.items():
        for (pd, offset), (buffers, _) in run["q8"].items():
            for buf in buffers:
                s = code_sentinel if not buf.is_floating_point() else run["sentinel"]
                assert (buf[:offset] == s).all() and (buf[-tail:] == s).all(), (isa, "8bit", pd, offset)
                assert torch.isfinite(buf.float()).all()
    best_q8 = runs[isas[-1]]["q8"]
    for isa in isas[:-1]:
        for key, (buffers, scales) in runs[isa]["q8"].items():
            ref_buffers, ref_scales = best_q8[key]
            for i, (a, b) in enumerate(zip(buffers + scales, ref_buffers + ref_scales)):
                if isa != "base":
                    assert torch.equal(a, b), (isa, isas[-1], "8bit", key, i)
                elif not a.is_floating_point():
                    assert float(((a.int() - b.int()).abs() > 1).float().mean()) < 0.01, (key, i)
                else:
                    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    # Every build, the portable one included, writes the spec's codes at every level threshold and its
    # fp32 neighbours (each settles its own estimate of the level there: csrc/adan_cpu_codes.h).
    for isa, run in runs.items():
        for key, (g, codes, scales) in run["q8_thresholds"].items():
            want_codes, want_scales = threshold_spec(key, g)
            np.testing.assert_array_equal(codes.numpy(), want_codes, err_msg=f"{isa} {key}")
            np.testing.assert_array_equal(scales.numpy(), want_scales, err_msg=f"{isa} {key}")
    # The blocks the vector builds treat apart (zero, tiny, NaN, Inf and huge values, a NaN old scale):
    # the same codes, scales and parameters, NaN where NaN.
    ref = runs[isas[-1]]
    for isa in isas[:-1]:
        if isa == "base":
            continue
        pairs = [(f"8bit {key} {i}", a, b) for key, tensors in runs[isa]["q8_edges"].items()
                 for i, (a, b) in enumerate(zip(tensors, ref["q8_edges"][key]))]
        pairs += [(f"bf16 {i}", a, b) for i, (a, b) in enumerate(zip(runs[isa]["bf16_edges"], ref["bf16_edges"]))]
        for what, a, b in pairs:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{isa} {what}: {m}")
    assert not torch.isfinite(ref["q8_edges"]["torch.float32"][0]).all()  # the NaN reached p
    p, m, n, d, neg = ref["bf16_edges"]
    assert m[3].isnan() and neg[3].isnan() and n[40].isinf() and m[100].isnan() and d[300].isnan()


def test_cpu_build_dispatch_picks_the_best_and_obeys_the_override():
    # This process: the best build the CPU has, capped by ADAN_PLUGIN_CPU_ISA if the suite runs with it set;
    # test_cpu_builds_agree checks each forced build.  (Picked once per process, hence subprocesses.)
    isas = _cpu_isas_here()
    cap = os.environ.get("ADAN_PLUGIN_CPU_ISA") or CPU_ISAS[-1]
    assert torch.ops.adan_plugin._cpu_isa() == isas[min(CPU_ISAS.index(cap), len(isas) - 1)]
    code = "import torch, adan_plugin._C; print(torch.ops.adan_plugin._cpu_isa())"
    for isa in CPU_ISAS[len(isas):]:  # a build the CPU lacks: the best below it
        proc = _run_python(code, isa)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == isas[-1], (isa, proc.stdout)
    # A name that is not a build: refused (naming the variable) when a fused optimizer is built, when an
    # optimizer that may use the kernels first steps (before it writes anything), and by the op itself.
    code = ("import torch, adan_plugin\n"
            "p = torch.nn.Parameter(torch.ones(40))\n"
            "p.grad = torch.ones(40)\n"
            "for fused in (True, None):\n"
            "    try:\n"
            "        opt = adan_plugin.Adan([p], fused=fused)\n"
            "        opt.step()\n"
            "    except RuntimeError as e:\n"
            "        print('optimizer refused:', e)\n"
            "assert not opt.state and bool((p == 1).all())\n"
            "ts = [[torch.ones(40)] for _ in range(6)]\n"
            "kw = dict(lr=1e-2, beta1=0.02, beta2=0.08, beta3=0.01, eps=1e-8, weight_decay=0.0, no_prox=False,\n"
            "          step=1.0, first=True, param_steps=[], exp_avg_scales=[], exp_avg_sq_scales=[],\n"
            "          exp_avg_diff_scales=[], neg_pre_grad_scales=[], kahan_comps=[])\n"
            "try:\n"
            "    torch.ops.adan_plugin.fused_adan_(*ts, **kw)\n"
            "except RuntimeError as e:\n"
            "    print('op refused:', e)\n"
            "print('untouched' if all(bool((t[0] == 1).all()) for t in ts) else 'written')\n")
    proc = _run_python(code, "avx9")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[-1] == "untouched", proc.stdout
    for line, who in zip(lines, ("optimizer", "optimizer", "op")):
        assert line.startswith(f"{who} refused:") and "ADAN_PLUGIN_CPU_ISA='avx9'" in line, proc.stdout


def test_step_allocates_no_parameter_sized_temporaries():
    def big_allocations(**kwargs):
        params = [torch.nn.Parameter(torch.randn(2 ** 20)) for _ in range(3)]  # 4 MiB each
        for p in params:
            p.grad = torch.randn_like(p)
        opt = Adan(params, max_grad_norm=1.0, **kwargs)
        opt.step()  # creates the state
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage >= 2 ** 20]

    assert big_allocations(fused=False, foreach=False)  # the detector sees the unfused path's temporaries
    assert big_allocations(fused=True) == []
    assert big_allocations(fused=True, state_dtype=torch.bfloat16) == []


@pytest.mark.parametrize("p_dtype,state_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                                 (torch.bfloat16, "8bit")])
def test_fused_cpu_step_with_clipping_allocates_no_parameter_sized_temporary(p_dtype, state_dtype):
    # The clip's fp32 norm of a 16-bit gradient: ATen's CPU norm with an output dtype converts its whole
    # input first, so it is taken over chunk views.  The largest allocation of the whole step (the
    # profiler records each op's) must stay far below the 16 MiB gradient; the norm must stay exact to
    # fp32 accumulation (measured 1.1e-5 relative; ATen's one norm over all 8M elements was 1.5e-4).
    from torch.profiler import ProfilerActivity, profile

    from adan_plugin.clip import grad_sq_norm

    n = 8 * 2 ** 20
    p = torch.nn.Parameter(torch.randn(n).to(p_dtype))
    p.grad = torch.randn(n).to(p_dtype)
    opt = Adan([p], fused=True, max_grad_norm=1.0, state_dtype=state_dtype)
    opt.step()  # creates the state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    assert largest <= 2 ** 21, f"{largest / 2 ** 20:.1f} MiB allocated by one op"
    exact = float(p.grad.double().square().sum())
    assert abs(float(grad_sq_norm([p.grad])) - exact) <= 5e-5 * exact
