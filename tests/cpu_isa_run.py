"""Worker for tests/test_fused.py's CPU-build tests, run in a subprocess because the build of the CPU loop is
picked once per process (``ADAN_PLUGIN_CPU_ISA`` caps it).

``python cpu_isa_run.py OUT``: two steps of ``fused_adan_`` (a first step, then a later one with a clip
coefficient) for every parameter/state dtype pair, on tensors of sizes around the vector widths (8 and 16
fp32 lanes, two vectors per iteration) and the 16384-element chunk, each a window into a buffer that starts
at the buffer's (64-byte aligned) start or 3 elements in, with sentinels around it. Saves the build's name
and every whole buffer (window and sentinels) to OUT; the same seed gives every build the same inputs."""
import sys

import torch

import adan_plugin._C  # noqa: F401  (registers the ops)
from adan_plugin.functional import STATE_KEYS
from q8_spec import threshold_cases

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 100, 16383, 16384, 16385, 40001)
OFFSETS = (0, 3)
SENTINEL = -7.0
TAIL = 5  # sentinel elements after each window
KW = dict(lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.05, no_prox=False, param_steps=[],
          exp_avg_scales=[], exp_avg_sq_scales=[], exp_avg_diff_scales=[], neg_pre_grad_scales=[], kahan_comps=[])


def main(out_path):
    ops = torch.ops.adan_plugin
    gen = torch.Generator().manual_seed(0)
    results = {}
    for pd in DTYPES:
        for sd in DTYPES:
            for offset in OFFSETS:
                buffers, lists = [], []
                for k in range(6):
                    ts = []
                    for n in SIZES:
                        buf = torch.full((offset + n + TAIL,), SENTINEL, dtype=pd if k < 2 else sd)
                        window = buf[offset:offset + n]
                        window.copy_(torch.randn(n, generator=gen).abs() if k == 3 else torch.randn(n, generator=gen))
                        buffers.append(buf)
                        ts.append(window)
                    lists.append(ts)
                ops.fused_adan_(*lists, **KW, step=1.0, first=True)
                for g in lists[1]:
                    g.copy_(torch.randn(g.shape, generator=gen))
                ops.fused_adan_(*lists, **KW, step=2.0, first=False, grad_coef=torch.tensor(0.5))
                results[(str(pd), str(sd), offset)] = buffers
    torch.save({"isa": ops._cpu_isa(), "results": results, "q8": q8_runs(gen), "q8_edges": q8_edge_runs(gen),
                "q8_thresholds": q8_threshold_runs(),
                "bf16_edges": bf16_state_edge_runs(gen),
                "offsets": OFFSETS, "sizes": SIZES,
                "tail": TAIL, "sentinel": SENTINEL, "code_sentinel": CODE_SENTINEL}, out_path)


CODE_SENTINEL = 77
Q8_SIZES = (1, 31, 32, 33, 255, 256, 257, 511, 4100, 16384, 16385, 20000)


def q8_runs(gen):
    """8-bit states (int8 m, d, neg; uint8 n; fp32 scales per 256 elements) for every parameter dtype, with
    Kahan buffers for 16-bit parameters: a first step, then a later one with a clip coefficient.  Code windows
    start 0 or 3 bytes into their buffers, so the code loads and stores are unaligned, with sentinels around."""
    ops = torch.ops.adan_plugin
    results = {}
    for pd in DTYPES:
        for offset in OFFSETS:
            bufs, lists = [], [[] for _ in range(7)]
            scales = [[] for _ in range(4)]
            for n in Q8_SIZES:
                for k in range(7):  # p, g, m, n, d, neg, kahan comp
                    dtype = pd if k in (0, 1, 6) else (torch.uint8 if k == 3 else torch.int8)
                    fill = SENTINEL if dtype.is_floating_point else CODE_SENTINEL
                    buf = torch.full((offset + n + TAIL,), fill, dtype=dtype)
                    window = buf[offset:offset + n]
                    if k < 2:
                        window.copy_(torch.randn(n, generator=gen))
                    elif k == 6:
                        window.zero_()
                    else:
                        window.copy_(torch.randint(0 if k == 3 else -127, 128, (n,), generator=gen).to(dtype))
                    bufs.append(buf)
                    lists[k].append(window)
                for sc in scales:
                    sc.append(torch.rand((n + 255) // 256, generator=gen) + 0.1)
            kw = dict(KW, exp_avg_scales=scales[0], exp_avg_sq_scales=scales[1], exp_avg_diff_scales=scales[2],
                      neg_pre_grad_scales=scales[3], kahan_comps=lists[6] if pd != torch.float32 else [])
            ops.fused_adan_(*lists[:6], **kw, step=1.0, first=True)
            for g in lists[1]:
                g.copy_(torch.randn(g.shape, generator=gen))
            ops.fused_adan_(*lists[:6], **kw, step=2.0, first=False, grad_coef=torch.tensor(0.5))
            results[(str(pd), offset)] = (bufs, [t for sc in scales for t in sc])
    return results


def q8_threshold_runs():
    """Codes and scales written for values at every level threshold and its fp32 neighbours
    (q8_spec.threshold_cases), where each build's estimate of the level is settled (csrc/adan_cpu_codes.h).
    Returns {state key: (g, codes, scales)}."""
    ops = torch.ops.adan_plugin
    out = {}
    for key, _, g in threshold_cases():
        k, n = STATE_KEYS.index(key), g.numel()
        codes = [torch.zeros(n, dtype=torch.uint8 if j == 1 else torch.int8) for j in range(4)]
        scales = [torch.zeros((n + 255) // 256) for _ in range(4)]
        ops.fused_adan_([torch.zeros(n)], [g.clone()], *[[c] for c in codes], lr=0.0, beta1=0.0, beta2=0.0,
                        beta3=0.0, eps=1e-8, weight_decay=0.0, no_prox=False, param_steps=[], step=1.0, first=True,
                        exp_avg_scales=[scales[0]], exp_avg_sq_scales=[scales[1]], exp_avg_diff_scales=[scales[2]],
                        neg_pre_grad_scales=[scales[3]], kahan_comps=[])
        out[key] = (g, codes[k], scales[k])
    return out


def bf16_state_edge_runs(gen):
    """bf16 states next to NaN, Inf and huge values (gradients and old states), which the vector builds
    store with the full conversion, and finite ones, which they store without its NaN test."""
    ops = torch.ops.adan_plugin
    n = 1000
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    states = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(4)]
    states[1].abs_()
    g[40], g[77] = float("inf"), 3e38
    # NaNs whose payload fills the mantissa: rounded to bf16 without the NaN test they would carry into
    # the sign bit and store -0.0.
    g.view(torch.int32)[3] = 0x7FFFFFFF
    states[0].view(torch.int16)[100] = 0x7FFF
    states[1][200], states[2][300], states[3][400] = float("inf"), float("nan"), -3e38
    ops.fused_adan_([p], [g], *[[s] for s in states], **KW, step=3.0, first=False)
    return [p, *states]


def q8_edge_runs(gen):
    """8-bit states through the blocks every vector build treats apart: all-zero blocks (zero codes and
    gradients: rsqrt of 0), gradients of 1e-30 (levels 0 below the first threshold), a NaN, an Inf and a
    1e30 gradient in one block each (the non-finite rescan and the clamped quantizer), and a block whose
    old scale is NaN; then a later step that carries all of it on.  fp32 and bf16 parameters (Kahan)."""
    ops = torch.ops.adan_plugin
    n, blk = 16 * 256 + 77, 256
    results = {}
    for pd in (torch.float32, torch.bfloat16):
        p, g = torch.randn(n, generator=gen).to(pd), torch.randn(n, generator=gen).to(pd)
        codes = [torch.randint(0 if k == 1 else -127, 128, (n,), generator=gen).to(torch.uint8 if k == 1 else torch.int8)
                 for k in range(4)]
        scales = [torch.rand((n + blk - 1) // blk, generator=gen) + 0.1 for _ in range(4)]
        g[0:blk] = 0
        for c in codes:
            c[0:blk] = 0
        for sc in scales:
            sc[0] = 0.0
        g[blk:2 * blk] = 1e-30
        g[2 * blk + 5], g[3 * blk + 9], g[4 * blk + 200] = float("nan"), float("inf"), 1e30
        scales[2][5] = float("nan")
        comps = [torch.zeros(n, dtype=pd)] if pd != torch.float32 else []
        kw = dict(KW, exp_avg_scales=[scales[0]], exp_avg_sq_scales=[scales[1]], exp_avg_diff_scales=[scales[2]],
                  neg_pre_grad_scales=[scales[3]], kahan_comps=comps)
        lists = [[p], [g], [codes[0]], [codes[1]], [codes[2]], [codes[3]]]
        ops.fused_adan_(*lists, **kw, step=3.0, first=False)
        g.copy_(torch.randn(n, generator=gen))
        g[6 * blk:7 * blk] = 0
        ops.fused_adan_(*lists, **kw, step=4.0, first=False)
        results[str(pd)] = [p, *codes, *scales, *comps]
    return results


if __name__ == "__main__":
    main(sys.argv[1])
