"""The Triton kernels compiled for a GPU (adan_plugin/triton_kernels.py, launched by triton_adan.py), against
our CUDA kernel, the float64 reference and the 8-bit spec.  Marked ``cuda``; they also need
``TRITON_INTERPRET=0`` in the environment (tests/conftest.py sets the interpreter on otherwise, for the CPU
suite), so a GPU run is

    TRITON_INTERPRET=0 python -m pytest -m cuda tests/test_triton_cuda.py

(tools/gpu_checks.sh does this).  What the interpreter tests (tests/test_triton.py) cannot show is
checked here: GPU execution, the 16-byte vector loads of aligned tensors next to unaligned ones, the GPU
compiler's FMA contraction, CUDA-graph capture, torch.compile of the step."""
import copy
import os

import pytest
import torch

from adan_plugin import Adan, _ext, lowmem
from adan_plugin.functional import STATE_KEYS
from cuda_graphs import assert_replay_equals_eager, grad_scaler_steps_without_sync, step_peak_bytes
from problems import make_problem, param_groups, reference_groups, run_torch
from q8_spec import assert_states_within_one_level, assert_zero_state_step_is_the_spec, spread_values
from reference import RefAdan

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(_INTERPRETED, reason="TRITON_INTERPRET=1 runs Triton on CPU tensors only; run "
                                 "with TRITON_INTERPRET=0 to compile the kernels for the GPU"),
              pytest.mark.skipif(not (_ext.extension_loaded() and _ext.fused_supported(torch.device("cuda"))),
                                 reason="adan_plugin._C was built without CUDA kernels (the reference here)")]

try:
    from adan_plugin import triton_adan
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    triton_adan = None
if triton_adan is None:
    pytest.skip("triton is not importable", allow_module_level=True)

B, C = triton_adan.BLOCK, triton_adan.CHUNK
OP_KW = dict(lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.05, no_prox=False, first=False,
             param_steps=[], exp_avg_scales=[], exp_avg_sq_scales=[], exp_avg_diff_scales=[],
             neg_pre_grad_scales=[])


def _lists(sizes, p_dtype, s_dtype, seed):
    """The op's six lists on the GPU; every third tensor a view one element into its buffer (no 16-byte
    vector loads for it), the others fresh (vector loads)."""
    gen = torch.Generator().manual_seed(seed)
    lists = []
    for k in range(6):
        dtype = p_dtype if k < 2 else s_dtype
        ts = []
        for i, n in enumerate(sizes):
            v = torch.randn(n, generator=gen)
            if k == 3:
                v = v.abs()
            buf = torch.empty(n + (i % 3 == 2), dtype=dtype, device="cuda")
            ts.append(buf[i % 3 == 2:].copy_(v))
        lists.append(ts)
    return lists


def _copy(lists):
    out = []
    for ts in lists:
        row = []
        for t in ts:
            off = t.storage_offset()
            row.append(torch.empty(off + t.numel(), dtype=t.dtype, device=t.device)[off:].copy_(t))
        out.append(row)
    return out


@pytest.mark.parametrize("p_dtype,s_dtype,kahan", [
    (torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, False),
    (torch.float16, torch.float32, False), (torch.float32, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, True), (torch.float16, torch.float16, True)])
def test_triton_op_matches_our_cuda_kernel(p_dtype, s_dtype, kahan):
    # Sizes around the tile and the chunk, several chunks, aligned and unaligned tensors, clip coefficient
    # and AMP scale.  Both kernels run the same fp32 math; the compilers contract multiply-adds
    # differently, so they agree to fp32 rounding (and then to one rounding step of a 16-bit type).
    sizes = [1, 3, B - 1, B, B + 1, C - 1, C + 1, 3 * C + 17, 1_000_003]
    ops = torch.ops.adan_plugin
    lists = _lists(sizes, p_dtype, s_dtype, seed=0)
    comps = [torch.randn(n, device="cuda").mul_(1e-3).to(p_dtype) for n in sizes] if kahan else []
    kw = dict(OP_KW, step=3.0, grad_coef=torch.tensor(0.5, device="cuda"),
              grad_scale=torch.tensor(4.0, device="cuda"))
    cuda_lists, cuda_comps = _copy(lists), [c.clone() for c in comps]
    grads_before = [g.clone() for g in lists[1]]
    ops.fused_adan_triton_(*lists, **dict(kw, kahan_comps=comps))
    ops.fused_adan_(*cuda_lists, **dict(kw, kahan_comps=cuda_comps))
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(lists[1], grads_before))  # gradients are read only
    low = p_dtype != torch.float32 or s_dtype != torch.float32
    tol = dict(rtol=8e-3, atol=1e-5) if low else dict(rtol=1e-6, atol=1e-7)
    for k, (ours, theirs) in enumerate(zip(lists, cuda_lists)):
        if k == 1:
            continue
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.float(), b.float(), **tol)
    if kahan:
        for pa, ca, pb, cb in zip(lists[0], comps, cuda_lists[0], cuda_comps):
            torch.testing.assert_close(pa.float() + ca.float(), pb.float() + cb.float(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("param_dtype,state_dtype,tol", [
    (torch.float32, None, 2e-5), (torch.bfloat16, None, 0.03), (torch.float16, None, 4e-3),
    (torch.float32, torch.bfloat16, 2e-3)])
def test_triton_optimizer_tracks_the_float64_reference(seed, param_dtype, state_dtype, tol):
    prob = make_problem(seed, steps=30, none_prob=0.1, n_groups=2, clip="binding")
    groups = param_groups(prob, dtype=param_dtype, device="cuda")
    opt = Adan(groups, fused=True, fused_backend="triton", state_dtype=state_dtype,
               max_grad_norm=prob.max_grad_norm)
    run_torch(opt, groups, prob.grads, dtype=param_dtype)
    assert opt.fused_backends == ("triton", "triton")
    ref = RefAdan(reference_groups(prob), max_grad_norm=prob.max_grad_norm)
    for grads in prob.grads:
        ref.step(grads)
    for ours, theirs in zip(groups, ref.params()):
        for p, r in zip(ours["params"], theirs):
            torch.testing.assert_close(p.detach().double().cpu(), r, rtol=tol, atol=tol)


@pytest.mark.parametrize("numel", [5000, 65536 + 300, 3 * 2 ** 20 + 17])
def test_triton_quantizer_is_the_spec_bit_for_bit(numel):
    # betas 0 from zero states: m = d = g, n = g*g, neg_pre_grad = -g exactly, so the codes and scales are
    # the spec's applied to known values, whatever the compiler contracts.
    g = spread_values(numel, seed=numel)
    states = [torch.zeros(numel, dtype=torch.uint8 if k == "exp_avg_sq" else torch.int8, device="cuda")
              for k in STATE_KEYS]
    scales = [torch.zeros(lowmem.n_blocks(numel), device="cuda") for _ in STATE_KEYS]
    torch.ops.adan_plugin.fused_adan_triton_(
        [torch.zeros(numel, device="cuda")], [g.cuda()], *[[s] for s in states],
        **dict(OP_KW, lr=0.0, beta1=0.0, beta2=0.0, beta3=0.0, weight_decay=0.0, step=2.0,
               exp_avg_scales=[scales[0]], exp_avg_sq_scales=[scales[1]], exp_avg_diff_scales=[scales[2]],
               neg_pre_grad_scales=[scales[3]], kahan_comps=[]))
    assert_zero_state_step_is_the_spec(g, states, scales, STATE_KEYS)


def test_8bit_groups_default_to_triton_on_the_gpu():
    # The CUDA kernel's 8-bit code is latency-bound (docs/benchmarks.md): fused=None and fused=True put
    # Triton first for 8-bit groups, a forced backend still wins, other state dtypes keep the CUDA kernel.
    big = [torch.nn.Parameter(torch.randn(5000, device="cuda")), torch.nn.Parameter(torch.randn(7, device="cuda"))]
    assert Adan(big, state_dtype="8bit").fused_backends == ("triton",)
    assert Adan(big, state_dtype="8bit", fused=True).fused_backends == ("triton",)
    assert Adan(big, state_dtype="8bit", fused_backend="cuda").fused_backends == ("cuda",)
    assert Adan(big, state_dtype=torch.bfloat16).fused_backends == ("cuda",)
    opt = Adan(big, state_dtype="8bit")
    for p in big:
        p.grad = torch.randn_like(p)
    opt.step()  # one backend per group: the small tensor (fp32 states) steps on Triton too
    assert lowmem.is_quantized(opt.state[big[0]]) and not lowmem.is_quantized(opt.state[big[1]])


@pytest.mark.parametrize("p_dtype,kahan", [(torch.float32, False), (torch.bfloat16, True)])
def test_triton_8bit_steps_agree_with_our_cuda_kernel(p_dtype, kahan):
    # From the same state each step: parameters to rounding, codes within one level on under 1% of
    # elements (the compilers' different FMA contraction moving a value across a level threshold).
    torch.manual_seed(0)
    shapes = [(64, 80), (5000,), (7, 9), (3, 4100), (65536 * 2 + 1000,)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(p_dtype)) for s in shapes]
    base = Adan(params, lr=1e-2, weight_decay=0.02, state_dtype="8bit", kahan_sum=kahan, fused=True)
    tol = dict(rtol=1e-6, atol=1e-7) if p_dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    for step in range(4):
        grads = [torch.randn(s, device="cuda") for s in shapes]
        runs = []
        for backend in ("triton", "cuda"):
            o = copy.deepcopy(base)
            for group in o.param_groups:
                group["fused_backend"] = backend
            for p, g in zip(o.param_groups[0]["params"], grads):
                p.grad = g.to(p_dtype)
            o.step()
            assert o.fused_backends == (backend,)
            runs.append(o)
        tr, cu = runs
        for x, y in zip(tr.param_groups[0]["params"], cu.param_groups[0]["params"]):
            torch.testing.assert_close(x.float(), y.float(), **tol)
            assert_states_within_one_level(tr.state[x], cu.state[y], STATE_KEYS, where=step)
        base = cu


@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_triton_graph_capture_and_replay_tracks_eager(state_dtype):
    # capturable=True: the step count lives on the device, so a captured step replays correctly; the
    # replayed run equals the eager Triton run bit for bit (same kernels, same inputs).
    torch.manual_seed(2)
    shapes = [(4100,), (300, 70), (9,), (C + 5,)]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(6)]

    def make():
        ps = [torch.nn.Parameter(torch.empty(s, device="cuda")) for s in shapes]
        with torch.no_grad():
            for i, p in enumerate(ps):
                p.copy_(torch.linspace(-1, 1, p.numel(), device="cuda").view(p.shape) * (i + 1))
                p.grad = torch.zeros_like(p)
        return ps, Adan(ps, lr=1e-2, fused=True, fused_backend="triton", capturable=True, state_dtype=state_dtype,
                        max_grad_norm=1.0)

    opt = assert_replay_equals_eager(make, grads)
    assert opt.fused_backends == ("triton",)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_triton_compiled_step_equals_eager(clip):
    # Without clipping the compiled step runs the same kernel on the same inputs: the same bits.  With
    # clipping inductor generates its own norm reduction (another summation order): fp32 rounding.
    torch.manual_seed(3)
    shapes = [(5000,), (64, 80), (7,)]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(4)]
    out = []
    for compiled in (False, True):
        torch._dynamo.reset()
        ps = [torch.nn.Parameter(torch.ones(s, device="cuda")) for s in shapes]
        opt = Adan(ps, lr=1e-2, fused=True, fused_backend="triton", capturable=True, max_grad_norm=clip)
        step = torch.compile(opt.step) if compiled else opt.step
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            step()
        out.append([p.detach().clone() for p in ps])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0 if clip == 0 else 1e-6, atol=0 if clip == 0 else 1e-7)


def test_triton_no_host_sync_with_clipping_and_grad_scaler():
    opt = grad_scaler_steps_without_sync(
        lambda params: Adan(params, lr=1e-2, fused=True, fused_backend="triton", max_grad_norm=1.0, weight_decay=0.02),
        checked_from=2)
    assert opt.fused_backends == ("triton",)


@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_triton_step_allocates_no_parameter_sized_temporaries(state_dtype):
    params = [torch.nn.Parameter(torch.randn(4 * 2 ** 20, device="cuda")) for _ in range(8)]  # 128 MiB
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adan(params, fused=True, fused_backend="triton", max_grad_norm=1.0, state_dtype=state_dtype)
    opt.step()  # creates the state and compiles
    opt.step()  # the device tables are cached from here on
    assert step_peak_bytes(opt) < 2 ** 20
