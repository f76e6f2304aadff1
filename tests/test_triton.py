"""The Triton kernels (adan_plugin/triton_kernels.py, launched by triton_adan.py), run on CPU tensors by
Triton's interpreter (see tests/triton_interp.py), against the float64 reference, the CPU kernel and the
CUDA kernel's code; 8-bit states and Kahan buffers; backend selection; the kernel compiled for GPUs (sm_90,
gfx942) without one.

What the interpreter cannot show: GPU execution itself (scheduling, the 16-byte vector loads, CUDA-graph
capture, the GPU compiler's FMA contraction of the update's multiply-adds); tools/bench_step.py --device
cuda and tools/gpu_checks.sh are for that.  tests/test_lowmem.py runs its 8-bit and Kahan tests on the
Triton kernel too (fixture ``kernel_or_triton``, path ids ``fused-triton*``)."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from triton_interp import one_tile_per_chunk, triton_adan  # noqa: I100  (sets TRITON_INTERPRET first)

if triton_adan is None:
    pytest.skip("triton is not importable", allow_module_level=True)

from adan_plugin import Adan, _ext, lowmem  # noqa: E402
from adan_plugin.adan import _triton_lacks  # noqa: E402
from adan_plugin.functional import STATE_KEYS  # noqa: E402
from conftest import REPO_ROOT  # noqa: E402
from problems import (assert_skipped_steps_change_nothing, make_problem, param_groups, run_amp,  # noqa: E402
                      run_grad_scaler, run_torch)
from reference import RefAdan  # noqa: E402
from test_fused import OP_KW, _assert_tracks, _op_lists, _reference, offset_views  # noqa: E402

BUILT = pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.float16, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
B, C = triton_adan.BLOCK, triton_adan.CHUNK


def _triton(**kw):
    return dict(fused_backend="triton", **kw)


# ---------------------------------------------------------------- the op against the C++ kernels
def _clone(x):
    """A copy of a (1-d) tensor or of (nested) lists of them; an offset (unaligned) view stays one."""
    if isinstance(x, torch.Tensor):
        off = x.storage_offset()
        return torch.empty(off + x.numel(), dtype=x.dtype)[off:].copy_(x)
    return [_clone(t) for t in x]


def _flat(x):
    return [x] if isinstance(x, torch.Tensor) else [t for item in x for t in _flat(item)]


def _assert_same_bits(x, y):
    if x.is_floating_point():
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)  # NaN bits aside, the same values
    else:
        assert torch.equal(x, y)


@BUILT
@pytest.mark.parametrize("param_dtype,state_dtype,kahan", [(p, s, False) for p, s in DTYPE_PAIRS] +
                         [(p, s, True) for p, s in DTYPE_PAIRS if p != torch.float32])
def test_op_matches_the_cuda_code_bit_for_bit_and_the_cpu_kernel(param_dtype, state_dtype, kahan):
    # Sizes around the block and the chunk; every third tensor an offset (unaligned) view; clip and AMP
    # scale together; Kahan buffers for 16-bit parameters.  The CUDA code built for the CPU does not
    # contract to FMA, nor does the interpreter: the same operations in the same order give the same
    # bits.  The CPU kernel's AVX2 loop contracts, so against it the tolerances of test_fused.py apply.
    sizes = [1, 3, B - 1, B, B + 1, C - 1, C + 1]
    make = offset_views(lambda i: i % 3 == 2)
    ops = torch.ops.adan_plugin
    lists = _op_lists(sizes, param_dtype, state_dtype, make)
    comps = [make(i, n, param_dtype).copy_(torch.randn(n) * 1e-3) for i, n in enumerate(sizes)] if kahan else []
    kw = dict(OP_KW, step=3.0, grad_coef=torch.tensor(0.5), grad_scale=torch.tensor(4.0))
    grads_before = [g.clone() for g in lists[1]]
    (cuda_code, cuda_comps), (cpu, cpu_comps) = (_clone([lists, comps]) for _ in range(2))
    ops.fused_adan_triton_(*lists, **dict(kw, kahan_comps=comps))
    ops._fused_adan_cuda_code_on_cpu_(*cuda_code, **dict(kw, kahan_comps=cuda_comps))
    ops.fused_adan_(*cpu, **dict(kw, kahan_comps=cpu_comps))
    for a, b, c in zip(lists + [comps], cuda_code + [cuda_comps], cpu + [cpu_comps]):
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y)
            if a is not comps:
                tol = dict(rtol=1e-5, atol=1e-6) if x.dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
                torch.testing.assert_close(x, z, **tol)
    for p, c, q, d in zip(lists[0], comps, cpu[0], cpu_comps):  # Kahan: the compensated values agree
        torch.testing.assert_close(p.float() + c.float(), q.float() + d.float(), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(g, h) for g, h in zip(lists[1], grads_before))  # gradients never written


def _q8_lists(sizes, param_dtype, make, kahan):
    """The op's six lists with 8-bit states (codes of random values spread over six decades, quantized by
    adan_plugin.lowmem), the four scale lists and the Kahan buffers (or [])."""
    gen = torch.Generator().manual_seed(len(sizes))

    def values(n):
        return torch.randn(n, generator=gen) * torch.pow(10.0, torch.empty(n).uniform_(-4, 2, generator=gen))

    lists, scales = [[], []], [[] for _ in STATE_KEYS]
    for i, n in enumerate(sizes):
        for k in range(2):
            lists[k].append(make(i, n, param_dtype).copy_(torch.randn(n, generator=gen)))
        for k, key in enumerate(STATE_KEYS):
            x = values(n)
            codes, sc = lowmem.quantize(key, x * x if key == "exp_avg_sq" else x)
            if len(lists) == 2 + k:
                lists.append([])
            lists[2 + k].append(make(i, n, codes.dtype).copy_(codes))
            scales[k].append(sc)
    comps = [make(i, n, param_dtype).copy_(torch.randn(n, generator=gen) * 1e-3) for i, n in enumerate(sizes)] \
        if kahan else []
    return lists, scales, comps


def _run_q8(op, lists, scales, comps, **kw):
    lists, scales, comps = _clone(lists), _clone(scales), _clone(comps)
    op(*lists, **dict(OP_KW, **kw, exp_avg_scales=scales[0], exp_avg_sq_scales=scales[1],
                      exp_avg_diff_scales=scales[2], neg_pre_grad_scales=scales[3], kahan_comps=comps))
    return lists, scales, comps


def _assert_codes_close(x, y, key):
    # One level apart on a few elements at most: the CPU kernel's build contracts the update's
    # multiply-adds into FMAs (the interpreter and the CUDA code built for the CPU do not), so a value
    # next to a rounding boundary of the map may land on the neighbouring code.
    diff = (x.int() - y.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01, key


@BUILT
@pytest.mark.parametrize("param_dtype,kahan", [(torch.float32, False), (torch.bfloat16, True),
                                               (torch.float16, True), (torch.bfloat16, False)])
def test_8bit_op_matches_the_cuda_code_bit_for_bit_and_the_cpu_kernel(param_dtype, kahan):
    # 8-bit states: sizes around the quantization block (256), the tile (BLOCK) and the chunk (two chunks
    # and a short last block), every third tensor an offset (unaligned) view, clip and AMP scale, a NaN
    # gradient (its blocks' scales become NaN, its codes cmax).  Codes, scales, parameters and Kahan
    # buffers are the CUDA code's bit for bit (both compute the maps of csrc/adan_quant.h with the same
    # fp32 operations).  Against the CPU kernel: codes within one level (FMA, see _assert_codes_close),
    # scales to fp32 rounding.
    sizes = [1, 255, 256, 257, B - 1, B + 1, C + 300]
    make = offset_views(lambda i: i % 3 == 2)
    lists, scales, comps = _q8_lists(sizes, param_dtype, make, kahan)
    lists[1][5][7] = float("nan")
    kw = dict(step=3.0, first=False, grad_coef=torch.tensor(0.5), grad_scale=torch.tensor(4.0))
    ours = _run_q8(torch.ops.adan_plugin.fused_adan_triton_, lists, scales, comps, **kw)
    cuda_code = _run_q8(torch.ops.adan_plugin._fused_adan_cuda_code_on_cpu_, lists, scales, comps, **kw)
    cpu = _run_q8(torch.ops.adan_plugin.fused_adan_, lists, scales, comps, **kw)
    for x, y in zip(_flat(ours), _flat(cuda_code)):
        _assert_same_bits(x, y)
    (p, g, *codes), sc, cp = ours
    (p2, g2, *codes2), sc2, cp2 = cpu
    assert bool(codes[0][5].eq(127).any()) and bool(sc[0][5].isnan().any())  # the NaN is visible
    assert all(torch.equal(x, y) for x, y in zip(g, lists[1][:5] + lists[1][6:]) if x is not g[5])
    for k, key in enumerate(STATE_KEYS):
        for i in range(len(sizes)):
            _assert_codes_close(codes[k][i], codes2[k][i], key)
            torch.testing.assert_close(sc[k][i], sc2[k][i], rtol=1e-5, atol=0, equal_nan=True)
    # Parameters: fp32 to rounding; bf16/fp16 to one 16-bit rounding; with Kahan, p + comp carries only
    # comp's own rounding (2^-9 of half p's ulp in bf16, ~2e-5 relative) when p lands one ulp apart.
    tol = dict(rtol=4e-5, atol=1e-6) if kahan else dict(rtol=1e-5, atol=1e-6) if param_dtype == torch.float32 \
        else dict(rtol=8e-3, atol=1e-5)
    for i in range(len(sizes)):
        x = p[i].float() + (cp[i].float() if kahan else 0.0)
        y = p2[i].float() + (cp2[i].float() if kahan else 0.0)
        torch.testing.assert_close(x, y, equal_nan=True, **tol)


def _small_launches(monkeypatch):
    """Launches of 7 programs of 2048-element chunks, so that a few tensors spill over launches."""
    monkeypatch.setattr(triton_adan, "MAX_PROGRAMS", 7)
    monkeypatch.setattr(triton_adan, "CHUNK", 2 * B)


def _assert_two_classes_over_several_launches():
    """The one cached plan holds an aligned and an unaligned launch class, with more than two launches."""
    (plan,) = triton_adan._plans.values()
    assert sorted(launch.aligned for launch in plan) == [False, True]
    assert sum(len(launch.launches) for launch in plan) > 2


def _device_step_counts(sizes):
    """Per-tensor device step counts for the launch tests: 4, but 1 (a first step) for tensor 3."""
    return [torch.tensor(1.0 if i == 3 else 4.0) for i in range(len(sizes))]


@BUILT
def test_8bit_and_kahan_across_several_launches(monkeypatch):
    # Launches of 7 programs of 2048-element chunks (8 quantization blocks each): tensors and their scale
    # lists spill over chunk and launch boundaries; an unaligned tensor; device step counts, one of them
    # a first step; bf16 parameters with Kahan buffers.
    _small_launches(monkeypatch)
    sizes = [5 * B + 3, 1, 0, 2 * B, 300, 3 * B - 1] * 2
    make = offset_views(lambda i: i == 4)
    lists, scales, comps = _q8_lists(sizes, torch.bfloat16, make, kahan=True)
    steps = _device_step_counts(sizes)
    kw = dict(step=0.0, first=False, step_tensor=torch.tensor(4.0), param_steps=steps)
    triton_adan._plans.clear()
    ours = _run_q8(torch.ops.adan_plugin.fused_adan_triton_, lists, scales, comps, **kw)
    _assert_two_classes_over_several_launches()
    theirs = _run_q8(torch.ops.adan_plugin._fused_adan_cuda_code_on_cpu_, lists, scales, comps, **kw)
    for x, y in zip(_flat(ours), _flat(theirs)):
        assert torch.equal(x, y)


@BUILT
def test_many_tensors_across_several_launches(monkeypatch):
    # Launches of 7 programs: tensors spill over launch boundaries, and an unaligned tensor between
    # aligned ones puts them into two launch classes; device step counts, one of them a first step.
    _small_launches(monkeypatch)
    sizes = [5 * B + 3, 1, 0, 2 * B, 9, 3 * B - 1] * 3
    make = offset_views(lambda i: i == 4)
    lists = _op_lists(sizes, torch.float32, torch.float32, make)
    steps = _device_step_counts(sizes)
    kw = dict(OP_KW, step=0.0, step_tensor=torch.tensor(4.0), param_steps=steps)
    theirs = [[t.clone() for t in ts] for ts in lists]
    triton_adan._plans.clear()
    torch.ops.adan_plugin.fused_adan_triton_(*lists, **kw)
    _assert_two_classes_over_several_launches()
    torch.ops.adan_plugin._fused_adan_cuda_code_on_cpu_(*theirs, **kw)
    for a, b in zip(lists, theirs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_plan_is_cached_and_rebuilt_when_a_tensor_moves():
    lists = _op_lists([10, 20], torch.float32, torch.float32, lambda i, n, dt: torch.empty(n, dtype=dt))
    kw = dict(OP_KW, step=2.0)
    triton_adan._plans.clear()
    torch.ops.adan_plugin.fused_adan_triton_(*lists, **kw)
    torch.ops.adan_plugin.fused_adan_triton_(*lists, **kw)
    assert len(triton_adan._plans) == 1
    before = lists[2][1].clone()
    lists[2][1] = before.clone()  # a state replaced (as a checkpoint load does): new address
    torch.ops.adan_plugin.fused_adan_triton_(*lists, **kw)
    assert len(triton_adan._plans) == 2 and not torch.equal(lists[2][1], before)  # the new tensor was written


def test_op_checks_before_writing():
    p, g = torch.randn(8), torch.randn(8)
    m, n, d, neg = (torch.zeros(8) for _ in range(4))
    op = torch.ops.adan_plugin.fused_adan_triton_
    kw = dict(OP_KW, step=1.0)
    p0 = p.clone()
    with pytest.raises(RuntimeError, match="neg_pre_grad of parameter 1 is torch.float64"):
        op([p, p.clone()], [g, g], [m, m], [n, n], [d, d], [neg, neg.double()], **kw)
    with pytest.raises(RuntimeError, match="has sizes"):
        op([p], [g], [m], [n], [d.view(2, 4)], [neg], **kw)
    with pytest.raises(RuntimeError, match="not dense"):
        op([torch.randn(16)[::2]], [g], [m], [n], [d], [neg], **kw)
    with pytest.raises(RuntimeError, match="found_inf must be a one-element float32"):
        op([p], [g], [m], [n], [d], [neg], **kw, found_inf=torch.tensor([0.0, 1.0]))
    assert torch.equal(p, p0) and not m.any()


# bf16 without clipping: torch's CPU _foreach_norm(dtype=float32), which the clip uses, converts bf16
# gradients to fp32 copies (a CPU-side cost outside the fused path).
@pytest.mark.parametrize("kw", [dict(max_grad_norm=1.0),
                                dict(state_dtype="8bit", kahan_sum=True, dtype=torch.bfloat16)])
def test_launcher_allocates_no_parameter_sized_temporaries(kw):
    size = C  # 16 KiB per int8 state; the launcher's tables are a few hundred bytes
    kw = dict(kw)
    dtype = kw.pop("dtype", torch.float32)
    params = [torch.nn.Parameter(torch.randn(size, dtype=dtype)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adan(params, **_triton(**kw))
    opt.step()  # creates the state
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)  # device-step mode, scalars too
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    assert [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage >= size] == []


# ---------------------------------------------------------------- the optimizer on the Triton backend
@pytest.mark.parametrize("clip", [None, "binding"])
def test_adan_on_triton_matches_reference(clip):
    prob = make_problem(1, steps=12, clip=clip)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **_triton())
    assert opt.fused_backends == ("triton",) * len(groups)
    run_torch(opt, groups, prob.grads)
    _assert_tracks(groups, _reference(prob), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("param_dtype,state_dtype,tol", [
    (torch.bfloat16, None, 0.03), (torch.float16, None, 4e-3), (torch.float32, torch.bfloat16, 2e-3),
    (torch.bfloat16, torch.float32, 0.03), (torch.float16, torch.bfloat16, 5e-3)])
def test_low_precision_params_and_states(param_dtype, state_dtype, tol):
    prob = make_problem(4, steps=10, none_prob=0.1, n_groups=2, clip="binding")
    groups = param_groups(prob, dtype=param_dtype)
    opt = Adan(groups, state_dtype=state_dtype, max_grad_norm=prob.max_grad_norm, **_triton())
    run_torch(opt, groups, prob.grads, dtype=param_dtype)
    _assert_tracks(groups, _reference(prob), rtol=tol, atol=tol)
    default = torch.float32 if param_dtype == torch.float16 else param_dtype  # fp16 states would overflow
    assert all(st[k].dtype == (state_dtype or default) for st in opt.state.values() for k in STATE_KEYS)


def test_found_inf_leaves_everything_untouched():
    prob = make_problem(7, steps=7, clip="binding", none_prob=0.0, n_groups=2)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **_triton())
    assert_skipped_steps_change_nothing(opt, groups, prob.grads, warmup=3)


def test_skipped_first_steps_late_parameters_and_grad_scale_match_reference():
    # GradScaler skips the first steps; one parameter gets its first gradient late, another only on a
    # skipped step: each parameter's first applied step must see a zero gradient difference.
    prob = make_problem(9, steps=9, clip="binding", none_prob=0.0, n_groups=2)
    for k in range(4):
        prob.grads[k][1][0] = None
    for k in range(8):
        prob.grads[k][0][0] = None
    skipped = {0, 1, 3, 8}
    ref = RefAdan([{"params": ts, **{k: v for k, v in g.items() if k != "shapes"}}
                   for g, ts in zip(prob.groups, prob.init)], max_grad_norm=prob.max_grad_norm)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **_triton())
    run_amp(opt, groups, prob.grads, skipped=skipped, grad_scale=8.0, ref=ref)
    _assert_tracks(groups, ref, rtol=2e-5, atol=2e-6)
    assert [float(g["step"]) for g in opt.param_groups] == [len(prob.grads) - len(skipped)] * 2


def test_grad_scaler_and_no_host_reads():
    from test_no_host_sync import RefuseHostReads
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    opt = Adan(model.parameters(), lr=1e-2, max_grad_norm=0.5, **_triton())
    plain = Adan(twin.parameters(), lr=1e-2, max_grad_norm=0.5, fused=False)
    assert opt._step_supports_amp_scaling
    run_grad_scaler(model, twin, opt, plain, x, y, iters=4, overflow_at=2, around_step=RefuseHostReads)
    assert int(opt.param_groups[0]["step"]) == 3 == plain.param_groups[0]["step"]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_compile_traces_the_triton_step():
    prob = make_problem(2, steps=3, clip="binding", none_prob=0.0, n_groups=1)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **_triton())
    compiled = torch.compile(opt.step, backend="aot_eager")  # fake impl + functionalization, no C++ build
    for grads in prob.grads:
        for p, g in zip(groups[0]["params"], grads[0]):
            p.grad = g.float()
        compiled()
    _assert_tracks(groups, _reference(prob), rtol=2e-5, atol=2e-6)


def test_torch_compile_traces_the_8bit_kahan_step(monkeypatch):
    # The fake implementation covers the scale lists and Kahan buffers (declared mutations): a compiled
    # step writes what the eager one writes, bit for bit.  (Under torch.compile each parameter's state
    # also gets its own device step count, as on every fused backend.)
    one_tile_per_chunk(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(n, dtype=torch.bfloat16)) for n in (5000, 30)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=1e-2, state_dtype="8bit", kahan_sum=True, max_grad_norm=1.0, **_triton())
    opt, eager = Adan(params, **kw), Adan(twins, **kw)
    compiled = torch.compile(opt.step, backend="aot_eager")
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape).bfloat16()
            q.grad = p.grad.clone()
        compiled()
        eager.step()
    assert lowmem.is_quantized(opt.state[params[0]])
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key, value in eager.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


def test_checkpoint_keeps_this_optimizers_backend():
    prob = make_problem(3, steps=4, none_prob=0.0, n_groups=1)
    groups = param_groups(prob)
    opt = Adan(groups, **_triton())
    run_torch(opt, groups, prob.grads[:2])
    other = Adan(param_groups(prob))  # fused=None on CPU: the compiled kernels or an unfused path
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.param_groups[0]["fused_backend"] is None
    assert other.fused_backends == (("cpu",) if _ext.extension_loaded() else (None,))


# ---------------------------------------------------------------- 8-bit states and Kahan on the optimizer
LOWMEM_SHAPES = [(64, 80), (4096,), (4095,), (7, 9)]  # 8-bit from 4096 elements on, fp32 states below


def _lowmem_problem(steps, seed=0):
    prob = make_problem(seed, steps=steps, none_prob=0.0, n_groups=1)
    gen = torch.Generator().manual_seed(seed)
    prob.init = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in LOWMEM_SHAPES]]
    prob.grads = [[[torch.randn(s, generator=gen, dtype=torch.float64) for s in LOWMEM_SHAPES]]
                  for _ in range(steps)]
    prob.groups[0].update(shapes=LOWMEM_SHAPES, weight_decay=0.02)
    return prob


def _lowmem_adan(prob, monkeypatch, kernel, **kw):
    """bf16 parameters with 8-bit states and Kahan buffers on ``kernel``: 'triton', or the compiled op
    ('cpu'; 'cuda_code' once _ops_as has swapped in the CUDA block code run on CPU tensors)."""
    groups = param_groups(prob, dtype=torch.bfloat16)
    if kernel == "triton":
        one_tile_per_chunk(monkeypatch)
        kw["fused_backend"] = "triton"
    else:
        kw["fused"] = True
    return groups, Adan(groups, state_dtype="8bit", kahan_sum=True, **kw)


def _state_bits(opt, groups):
    """Per parameter (in group order): the parameter and its state, for bit-for-bit comparisons."""
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
            for g in groups for p in g["params"]]


def _assert_same_state_bits(a, b):
    for (p, st), (q, su) in zip(a, b):
        assert torch.equal(p, q) and st.keys() == su.keys()
        for key in st:
            assert torch.equal(st[key], su[key]), key


@BUILT
def test_8bit_kahan_adan_matches_the_cuda_code_through_skipped_steps_and_late_parameters(monkeypatch):
    # Adan(fused_backend="triton", state_dtype="8bit", kahan_sum=True) on bf16 parameters, 8-bit and fp32
    # states side by side (4096 and 4095 elements), GradScaler-style: scaled gradients, skipped steps
    # (NaN gradients, found_inf = 1), one parameter whose first gradient comes late, on a skipped step.
    # After every step, every parameter, Kahan buffer, code, scale and step count equals the CUDA code's
    # bit for bit; a skipped step writes nothing.
    prob = _lowmem_problem(steps=8)
    for k in range(4):
        prob.grads[k][0][1] = None  # its first gradient: step 4, skipped; its first applied one: step 5
    skipped = {0, 2, 4, 6}
    runs = {}
    for kernel in ("triton", "cuda_code"):
        with monkeypatch.context() as mp:
            if kernel == "cuda_code":
                ops = torch.ops.adan_plugin
                mp.setattr(ops, "fused_adan_", ops._fused_adan_cuda_code_on_cpu_)
            groups, opt = _lowmem_adan(prob, mp, kernel, max_grad_norm=2.0)
            shots = []
            for k, grads in enumerate(prob.grads):
                before = _state_bits(opt, groups) if opt.state else None
                run_amp(opt, groups, [grads], skipped={0} if k in skipped else (), grad_scale=8.0,
                        dtype=torch.bfloat16)
                shots.append((_state_bits(opt, groups), float(opt.param_groups[0]["step"])))
                if before is not None and k in skipped:
                    # A parameter's state may be created on a skipped step (zeros, as on the CPU kernel).
                    fresh = [not st for _, st in before]
                    _assert_same_state_bits([b for b, f in zip(before, fresh) if not f],
                                            [a for a, f in zip(shots[-1][0], fresh) if not f])
                    assert all(not v.any() for (_, st), f in zip(shots[-1][0], fresh) if f for v in st.values())
            runs[kernel] = (opt, groups, shots)
    opt, groups, ours = runs["triton"]
    theirs = runs["cuda_code"][2]
    assert opt.fused_backends == ("triton",)
    st = [opt.state[p] for p in groups[0]["params"]]
    assert [lowmem.is_quantized(s) for s in st] == [True, True, False, False]
    assert all(s["kahan_comp"].dtype == torch.bfloat16 for s in st)
    for (a, ka), (b, kb) in zip(ours, theirs):
        _assert_same_state_bits(a, b)
        assert ka == kb
    assert ours[-1][1] == len(prob.grads) - len(skipped)
    assert float(st[1]["step"]) == 2  # the late parameter: steps 5 and 7


@BUILT
def test_8bit_kahan_adan_matches_the_cpu_kernel_and_its_state_dict_round_trips(monkeypatch):
    # The Triton backend against the CPU kernel on the same problem (codes within one level: FMA), then a
    # state_dict round trip: a fresh Triton-backed Adan loads it bit for bit and continues exactly like
    # the original; the CPU-kernel Adan loads it too (the state format does not depend on the backend).
    prob = _lowmem_problem(steps=6, seed=1)
    groups, opt = _lowmem_adan(prob, monkeypatch, "triton", lr=1e-2)
    cpu_groups, cpu = _lowmem_adan(prob, monkeypatch, "cpu", lr=1e-2)
    run_torch(opt, groups, prob.grads[:4], dtype=torch.bfloat16)
    run_torch(cpu, cpu_groups, prob.grads[:4], dtype=torch.bfloat16)
    for p, q in zip(groups[0]["params"], cpu_groups[0]["params"]):
        a, b = opt.state[p], cpu.state[q]
        torch.testing.assert_close(p.float() + a["kahan_comp"].float(), q.float() + b["kahan_comp"].float(),
                                   rtol=1e-4, atol=1e-5)
        for key in STATE_KEYS:
            if lowmem.is_quantized(a):
                _assert_codes_close(a[key], b[key], key)
                torch.testing.assert_close(a[key + "_scale"], b[key + "_scale"], rtol=1e-4, atol=1e-7)
            else:
                torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)

    saved = copy.deepcopy(opt.state_dict())
    twin_groups = [dict(g, params=[torch.nn.Parameter(p.detach().clone()) for p in g["params"]]) for g in groups]
    twin = Adan(twin_groups, state_dtype="8bit", kahan_sum=True, fused_backend="triton")
    twin.load_state_dict(copy.deepcopy(saved))
    _assert_same_state_bits(_state_bits(opt, groups), _state_bits(twin, twin_groups))
    run_torch(opt, groups, prob.grads[4:], dtype=torch.bfloat16)
    run_torch(twin, twin_groups, prob.grads[4:], dtype=torch.bfloat16)
    _assert_same_state_bits(_state_bits(opt, groups), _state_bits(twin, twin_groups))
    cpu.load_state_dict(copy.deepcopy(saved))
    for i, q in enumerate(cpu_groups[0]["params"]):
        for key, value in lowmem.loaded_form(saved["state"][i], "").items():  # codes saved as '<key>_codes'
            assert torch.equal(cpu.state[q][key], value), key


# ---------------------------------------------------------------- selection
def test_fused_none_never_picks_triton_on_cpu():
    p = torch.nn.Parameter(torch.randn(3))
    assert Adan([p]).fused_backends == (("cpu",) if _ext.extension_loaded() else (None,))
    assert Adan([p], fused=False).fused_backends == (None,)
    if _ext.extension_loaded():
        assert Adan([p], fused_backend="cpu").fused_backends == ("cpu",)
    assert Adan([p], fused_backend="triton").fused_backends == ("triton",)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(fused_backend="triton", caution=True), ValueError, "caution"),
    (dict(fused_backend="tritno"), ValueError, "fused_backend must be None or one of"),
    (dict(fused_backend="triton", fused=False), ValueError, "needs? the fused kernels"),
    (dict(fused_backend="triton", foreach=True), ValueError, "needs? the fused kernels"),
    (dict(fused_backend="cuda"), RuntimeError, "runs on cuda tensors, not on cpu"),
])
def test_bad_backend_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        Adan([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_only_caution_is_refused_by_the_triton_backend():
    # 8-bit states and kahan_sum run on the Triton kernels (issue 12); caution runs on no fused kernel.
    group = dict(Adan([torch.nn.Parameter(torch.randn(3))]).defaults, fused_backend="triton")
    assert _triton_lacks(group) == []
    assert _triton_lacks({**group, "kahan_sum": True, "state_dtype": "8bit"}) == []
    assert _triton_lacks({**group, "caution": True}) == ["caution"]
    with pytest.raises(ValueError, match="fused_backend='triton': the Triton kernels do not implement caution"):
        Adan._check_fused_options({**group, "caution": True})
    for kw in (dict(state_dtype="8bit"), dict(kahan_sum=True), dict(state_dtype="8bit", kahan_sum=True)):
        p = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
        assert Adan([p], fused_backend="triton", **kw).fused_backends == ("triton",)


def test_op_refuses_bad_8bit_and_kahan_arguments_before_writing():
    n = 300
    p, g = torch.randn(n), torch.randn(n)
    codes = [torch.zeros(n, dtype=torch.uint8 if k == "exp_avg_sq" else torch.int8) for k in STATE_KEYS]
    scales = [torch.zeros(2) for _ in STATE_KEYS]
    op = torch.ops.adan_plugin.fused_adan_triton_
    p0 = p.clone()

    def call(params=(p,), grads=(g,), states=codes, sc=scales, comps=()):
        op(list(params), list(grads), *[[s] for s in states], **dict(
            OP_KW, step=2.0, exp_avg_scales=[sc[0]], exp_avg_sq_scales=[sc[1]], exp_avg_diff_scales=[sc[2]],
            neg_pre_grad_scales=[sc[3]], kahan_comps=list(comps)))

    with pytest.raises(RuntimeError, match=r"exp_avg_sq of parameter 0 is torch.int8 .* expected torch.uint8"):
        call(states=[codes[0], codes[0], codes[2], codes[3]])
    with pytest.raises(RuntimeError, match=r"exp_avg_diff_scales\[0\] must be a contiguous float32 tensor of 2 "):
        call(sc=scales[:2] + [torch.zeros(3)] + scales[3:])
    with pytest.raises(RuntimeError, match=r"neg_pre_grad_scales\[0\] must be a contiguous float32"):
        call(sc=scales[:3] + [torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="kahan_comps are for bfloat16/float16 parameters, parameter 0 is"):
        call(comps=[torch.zeros(n)])
    with pytest.raises(RuntimeError, match=r"kahan_comps\[0\] must match its parameter"):
        call(params=[p.bfloat16()], grads=[g.bfloat16()], comps=[torch.zeros(n, dtype=torch.float16)])
    with pytest.raises(RuntimeError, match="exp_avg_scales must be empty unless the states are 8-bit"):
        op([p], [g], [torch.zeros(n)], [torch.zeros(n)], [torch.zeros(n)], [torch.zeros(n)],
           **dict(OP_KW, step=2.0, exp_avg_scales=[scales[0]]))
    with pytest.raises(RuntimeError, match="exp_avg_sq_scales must have one entry per parameter"):
        op([p], [g], *[[c] for c in codes], **dict(OP_KW, step=2.0, exp_avg_scales=[scales[0]]))
    assert torch.equal(p, p0) and not any(s.any() for s in scales) and not any(c.any() for c in codes)


def test_triton_on_cpu_outside_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(triton_adan, "interpreted", lambda: False)
    monkeypatch.setattr(_ext, "_triton_status", {})
    with pytest.raises(RuntimeError, match="CPU tensors only under TRITON_INTERPRET=1"):
        Adan([torch.nn.Parameter(torch.randn(3))], fused_backend="triton")


def test_triton_imported_before_the_interpreter_was_set_is_refused_with_the_reason():
    # timm and mmcv import triton; if that happens before TRITON_INTERPRET=1, the interpreted kernel could
    # not call triton.language's own jit'd helpers (tl.max): the backend says so instead of failing mid-step.
    code = ("import os, torch, triton.language\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from adan_plugin import triton_adan\n"
            "print(triton_adan.supports(torch.device('cpu')))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(False, 'triton.language was imported before TRITON_INTERPRET=1 was set" in run.stdout


@pytest.mark.parametrize("compiled_cuda,triton_ok,lacks,requested,expected,state_dtype", [
    (True, True, (), None, "cuda", None),          # compiled kernels first
    (False, True, (), None, "triton", None),       # then Triton
    (False, False, (), None, None, None),          # then an unfused path (fused=None) / an error (fused=True)
    (False, True, ("caution",), None, None, None),
    (True, True, ("caution",), None, "cuda", None),
    (True, True, (), "triton", "triton", None),    # forced
    (False, True, (), "cuda", None, None),
    (True, True, (), None, "cuda", torch.bfloat16),
    # 8-bit states: Triton first, the compiled kernels when Triton cannot, and a forced backend still wins
    (True, True, (), None, "triton", "8bit"),
    (True, False, (), None, "cuda", "8bit"),
    (True, True, ("caution",), None, "cuda", "8bit"),
    (True, True, (), "cuda", "cuda", "8bit"),
])
def test_gpu_selection_order(monkeypatch, compiled_cuda, triton_ok, lacks, requested, expected, state_dtype):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_ext, "extension_loaded", lambda: True)
    monkeypatch.setattr(_ext, "fused_supported", lambda device: device.type == "cpu" or compiled_cuda)
    monkeypatch.setattr(_ext, "_triton_status", {cuda: (triton_ok, "" if triton_ok else "no GPU Triton")})
    backend, why = _ext.select_fused_backend(cuda, requested, lacks, state_dtype)
    assert backend == expected
    assert (why == "") == (expected is not None)


def test_8bit_groups_ask_for_triton_first(monkeypatch):
    # Every place Adan selects a backend (fused=None's check, fused_backends, the step's checks) passes
    # the group's state dtype, which puts Triton first for 8-bit groups only.
    seen = []
    real = _ext.select_fused_backend

    def spy(device, requested=None, lacks=(), state_dtype=None):
        seen.append(state_dtype == "8bit")
        return real(device, requested, lacks, state_dtype)

    monkeypatch.setattr(_ext, "select_fused_backend", spy)
    for state_dtype, expected in (("8bit", True), (torch.bfloat16, False), (None, False)):
        seen.clear()
        p = torch.nn.Parameter(torch.randn(5000))
        opt = Adan([p], state_dtype=state_dtype)
        assert opt.fused_backends == ("cpu",)
        p.grad = torch.randn_like(p)
        opt.step()
        assert len(seen) >= 3 and set(seen) == {expected}, (state_dtype, seen)


def test_gpu_without_compiled_kernels_uses_triton_then_unfused(monkeypatch):
    # An Adan on a "GPU" (meta tensors standing in): Triton when it is there, the unfused path when not.
    meta = torch.device("meta")
    monkeypatch.setattr(_ext, "_triton_status", {meta: (True, "")})
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert Adan([p]).fused_backends == ("triton",)
    assert Adan([p], caution=True).fused_backends == (None,)
    big = torch.nn.Parameter(torch.empty(5000, device="meta", dtype=torch.bfloat16))
    assert Adan([big], state_dtype="8bit", kahan_sum=True).fused_backends == ("triton",)  # issue 12
    monkeypatch.setattr(_ext, "_triton_status", {meta: (False, "Triton is not importable")})
    assert Adan([p]).fused_backends == (None,)
    # fused=True builds on meta (as torch's fused optimizers do); stepping there says why it cannot.
    opt = Adan([p], fused=True)
    p.grad = torch.empty_like(p)
    with pytest.raises(RuntimeError, match="Triton: Triton is not importable"):
        opt.step()


# ---------------------------------------------------------------- the benchmark row
def test_bench_triton_row_constructs_and_steps(monkeypatch):
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    import bench_step as bs
    params = [torch.randn(s, requires_grad=True) for s in [(3, 4), (5,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = bs.VARIANTS["ours-fused-triton"].make(params)
    opt.step()
    assert opt.fused_backends == ("triton",)
    assert bs.step_bytes(opt) == 44 * 17
    monkeypatch.setattr(triton_adan, "interpreted", lambda: False)
    monkeypatch.setattr(_ext, "_triton_status", {})
    with pytest.raises(bs.Unavailable, match="TRITON_INTERPRET=1"):
        bs.VARIANTS["ours-fused-triton"].make(params)


# ---------------------------------------------------------------- compiled for GPUs, without a GPU
_COMPILE = textwrap.dedent("""
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adan_plugin import triton_adan as ta

    def compile_kernel(target, p_dtype, s_dtype, aligned, device_scalars, kahan=False):
        k = ta._adan_kernel
        sig = {name: "fp32" for name in k.arg_names}
        sig.update(tensor_table="*i64", chunk_table="*i32", chunk_base="i32", host_step="i64")
        consts = dict(FIRST=False, HAS_PARAM_STEPS=device_scalars, ALIGNED=aligned, LOW1=True, LOW2=False,
                      P_DTYPE=p_dtype, S_DTYPE=s_dtype, Q8=s_dtype == tl.int8, HAS_COMP=kahan, ROW=ta._ROW,
                      BLOCK=ta.BLOCK, CHUNK=ta.CHUNK, QBLOCK=ta.QBLOCK)
        for name in ("step_ptr", "grad_coef_ptr", "grad_scale_ptr", "found_inf_ptr"):
            if device_scalars:
                sig[name] = "*fp32"
            else:
                consts[name] = None
        sig.update({name: "constexpr" for name in consts})
        src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in consts.items()})
        return triton.compile(src, target=target, options={"num_warps": ta.NUM_WARPS}).asm

    out = {}
    if sys.argv[1] == "1":
        for name, args in {"bf16-aligned": (tl.bfloat16, tl.bfloat16, True, True),
                           "fp16-fp32-unaligned": (tl.float16, tl.float32, False, False),
                           "fp32-8bit-aligned": (tl.float32, tl.int8, True, True),
                           "bf16-8bit-kahan-unaligned": (tl.bfloat16, tl.int8, False, False, True)}.items():
            asm = compile_kernel(GPUTarget("cuda", 90, 32), *args)
            out[name] = [line.split()[0] for line in asm["ptx"].splitlines()
                         if line.strip().startswith(("ld.global", "st.global"))] + [str(len(asm["cubin"]))]
    for name, args in {"rocm-fp32-bf16-aligned": (tl.float32, tl.bfloat16, True, False),
                       "rocm-bf16-8bit-kahan-aligned": (tl.bfloat16, tl.int8, True, True, True)}.items():
        asm = compile_kernel(GPUTarget("hip", "gfx942", 64), *args)
        out[name] = [line.split()[0] for line in asm["amdgcn"].splitlines()
                     if "_load_" in line or "_store_" in line] + [str(len(asm["hsaco"]))]
    print(json.dumps(out))
""")


def _ptxas():
    for path in (os.environ.get("TRITON_PTXAS_PATH"), "/usr/local/cuda/bin/ptxas"):
        if path and os.path.isfile(path):
            return path
    import shutil
    return shutil.which("ptxas")


def test_kernel_compiles_for_nvidia_and_amd_gpus_with_vector_loads_when_aligned():
    # Not interpreted (TRITON_INTERPRET unset in the child): the real compiler pipeline down to a cubin
    # for sm_90 (needs ptxas: the CUDA toolkit CI builds with) and a hsaco for gfx942 (MI300), float and
    # 8-bit (with Kahan) states.  The alignment hints must give 16-byte loads and stores (the 8-bit
    # launch's fp32 parameters); the unaligned launches must not use them.
    import json
    ptxas = _ptxas()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if ptxas:
        env["TRITON_PTXAS_PATH"] = ptxas
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _COMPILE, "1" if ptxas else "0"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    rocm = out.pop("rocm-fp32-bf16-aligned")
    assert int(rocm[-1]) > 0 and any("dwordx4" in op for op in rocm)
    assert int(out.pop("rocm-bf16-8bit-kahan-aligned")[-1]) > 0
    if not ptxas:
        pytest.skip("no ptxas (CUDA toolkit) here: the NVIDIA half of this check did not run")
    for name, ops in out.items():
        assert int(ops[-1]) > 0, name  # a cubin came out
        vector = [op for op in ops[:-1] if ".v4." in op]
        if name.endswith("-aligned"):
            assert any(op.startswith("ld.global.v4") for op in vector), (name, ops)
            assert any(op.startswith("st.global.v4") for op in vector), (name, ops)
        else:
            assert vector == [], (name, ops)
