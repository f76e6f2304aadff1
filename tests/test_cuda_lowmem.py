"""8-bit states and Kahan-compensated parameters on the CUDA kernel, on a GPU.  Marked ``cuda``: skipped
without one (tools/gpu_checks.sh runs them).

The CPU suite checks the CUDA block code run on CPU tensors against the NumPy spec and the float64
reference; here the same code runs as compiled by nvcc for the GPU, so what these tests add is the device
build: nvcc's FMA contraction, the launch plan, 64-bit device addressing, graphs, the caching allocator.
8-bit groups step on the Triton kernel by default on a GPU (tests/test_triton_cuda.py), so these tests
name ``fused_backend="cuda"``.
"""

import pytest
import torch

from adan_plugin import Adan, _ext, lowmem
from adan_plugin.functional import STATE_KEYS
from cuda_graphs import assert_replay_equals_eager, step_peak_bytes
from problems import stepped_copy
from q8_spec import assert_states_within_one_level, assert_zero_state_step_is_the_spec, spread_values

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (_ext.extension_loaded() and _ext.fused_supported(torch.device("cuda"))),
                                 reason="adan_plugin._C was built without CUDA kernels")]

SIZES = [(64, 80), (5000,), (7, 9), (3, 4100), (65536 * 2 + 1000,)]  # (7, 9): under 4096, fp32 states


def _q8_zero_states(numel, device):
    states = [torch.zeros(numel, dtype=torch.uint8 if k == "exp_avg_sq" else torch.int8, device=device)
              for k in STATE_KEYS]
    scales = [torch.zeros(lowmem.n_blocks(numel), device=device) for _ in STATE_KEYS]
    return states, scales


@pytest.mark.parametrize("numel", [5000, 65536 + 300, 3 * 2 ** 20 + 17])
def test_cuda_quantizer_is_the_spec_bit_for_bit(numel):
    # betas 0 from zero states: m = d = g, n = g*g, neg_pre_grad = -g, exact in fp32 whatever the compiler
    # contracts, so the codes and scales the GPU writes are the spec's applied to known values.
    g = spread_values(numel, seed=numel)
    states, scales = _q8_zero_states(numel, "cuda")
    torch.ops.adan_plugin.fused_adan_(
        [torch.zeros(numel, device="cuda")], [g.cuda()], *[[s] for s in states], beta1=0.0, beta2=0.0,
        beta3=0.0, step=2.0, first=False, lr=0.0, eps=1e-8, weight_decay=0.0, no_prox=False, param_steps=[],
        exp_avg_scales=[scales[0]], exp_avg_sq_scales=[scales[1]], exp_avg_diff_scales=[scales[2]],
        neg_pre_grad_scales=[scales[3]], kahan_comps=[])
    assert_zero_state_step_is_the_spec(g, states, scales, STATE_KEYS)


def _on_cpu(opt, **kw):
    """An optimizer over CPU copies of ``opt``'s parameters, loaded with its state dict."""
    kw = {k: v for k, v in kw.items() if k != "fused_backend"}
    cpu = Adan([torch.nn.Parameter(p.detach().cpu()) for p in opt.param_groups[0]["params"]], **kw)
    cpu.load_state_dict(opt.state_dict())
    return cpu


@pytest.mark.parametrize("p_dtype,kahan", [(torch.float32, False), (torch.bfloat16, True)])
def test_cuda_8bit_steps_agree_with_the_block_code_on_cpu(p_dtype, kahan):
    # Every step starts the GPU kernel and the same block code run on CPU tensors from the same state, so
    # they differ only by one step's fp32 rounding (nvcc contracts multiply-adds into FMAs; the CPU build
    # of the block code does not): parameters and Kahan buffers to rounding, codes by at most one level
    # on under 1% of elements (a value the rounding moved across a level threshold), scales to rounding.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(p_dtype)) for s in SIZES]
    kw = dict(lr=1e-2, weight_decay=0.02, state_dtype="8bit", kahan_sum=kahan, fused=True, fused_backend="cuda")
    opt = Adan(params, **kw)
    cuda_code = torch.ops.adan_plugin._fused_adan_cuda_code_on_cpu_
    tol = dict(rtol=1e-6, atol=1e-7) if p_dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(s, generator=gen) for s in SIZES]
        gpu = stepped_copy(opt, grads)
        cpu = stepped_copy(_on_cpu(opt, **kw), grads, op=cuda_code)
        assert gpu.fused_backends == ("cuda",)
        for x, y in zip(gpu.param_groups[0]["params"], cpu.param_groups[0]["params"]):
            torch.testing.assert_close(x.detach().cpu().float(), y.detach().float(), **tol)
            sx, sy = gpu.state[x], cpu.state[y]
            assert lowmem.is_quantized(sx) == (x.numel() >= 4096)
            if kahan:
                # the buffer holds what rounding to bf16 lost: compare the parameter plus its buffer
                torch.testing.assert_close((x.detach().float() + sx["kahan_comp"].float()).cpu(),
                                           y.detach().float() + sy["kahan_comp"].float(), rtol=2e-5, atol=1e-6)
            assert_states_within_one_level(sx, sy, STATE_KEYS, where=step)
        opt = gpu


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, "8bit"])
def test_cuda_kahan_recovers_updates_below_half_an_ulp(state_dtype):
    # Constant gradient 1 with beta1 = beta3 = 0: every step moves a weight by lr / (1 + eps) = 1e-4, under
    # half a bf16 ulp at 1.0.  Without the buffer bf16 never moves; with it, 1000 steps end within one
    # bf16 step (4e-3) of fp32's 1 - 0.1.
    out = {}
    for kahan in (False, True):
        p = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16, device="cuda"))
        opt = Adan([p], lr=1e-4, betas=(0.0, 0.92, 0.0), eps=1e-8, kahan_sum=kahan, fused=True,
                   fused_backend="cuda", state_dtype=state_dtype)
        for _ in range(1000 if kahan else 3):
            p.grad = torch.ones_like(p)
            opt.step()
        out[kahan] = p.detach().float().cpu()
    assert torch.equal(out[False], torch.ones(8192))
    assert float((out[True] - 0.9).abs().max()) <= 4e-3


def test_cuda_8bit_graph_capture_replays_like_eager():
    # Capturable 8-bit + Kahan steps captured once and replayed equal the same steps run eagerly, bit for
    # bit (same kernels, same inputs); the step count lives on the device.
    torch.manual_seed(1)
    shapes = [(4100,), (300, 70), (9,)]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(6)]

    def make():
        ps = [torch.nn.Parameter(torch.ones(s, device="cuda", dtype=torch.bfloat16)) for s in shapes]
        for p in ps:
            p.grad = torch.zeros_like(p)
        return ps, Adan(ps, lr=1e-2, fused=True, fused_backend="cuda", capturable=True, state_dtype="8bit",
                        kahan_sum=True, max_grad_norm=1.0)

    assert_replay_equals_eager(make, grads)


def test_cuda_8bit_step_allocates_no_parameter_sized_temporaries():
    params = [torch.nn.Parameter(torch.randn(4 * 2 ** 20, device="cuda", dtype=torch.bfloat16)) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adan(params, fused=True, fused_backend="cuda", state_dtype="8bit", kahan_sum=True)
    opt.step()  # creates the state
    assert step_peak_bytes(opt) < 2 ** 20
