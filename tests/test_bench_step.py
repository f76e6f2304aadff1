"""Smoke tests of tools/bench_step.py's machinery on tiny shapes: byte accounting, shapes, the memory
probe, n/a rows, target verdicts and the markdown/PNG it writes.  No timing is asserted."""
import math
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
import torch.nn as nn

from adan_plugin import _ext
from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import bench_step as bs  # noqa: E402

SHAPES = [(3, 4), (5,)]
N = 17


def _params(shapes=SHAPES, grads=True):
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    if grads:
        for p in ps:
            p.grad = torch.randn_like(p)
    return ps


@pytest.mark.parametrize("variant", ["ours-foreach", "ours-single", "timm-foreach", "mmpretrain"])
def test_adan_fp32_moves_44_bytes_per_param(variant):
    opt = bs.VARIANTS[variant].make(_params())
    opt.step()
    opt.step()  # mmpretrain replaces pre_grad after a step: count what it holds then
    assert bs.step_bytes(opt) == 44 * N
    assert bs.state_bytes(opt) == 4 * 4 * N


def test_adamw_counts_its_step_tensor():
    opt = bs.VARIANTS["adamw-foreach"].make(_params())
    opt.step()
    # p read+write 8, g 4, exp_avg and exp_avg_sq read+write 16 per element; an fp32 step tensor per param.
    assert bs.step_bytes(opt) == 28 * N + 2 * 4 * len(SHAPES)


def test_bf16_state_counts_two_bytes_and_skips_params_without_grad():
    with_grad = _params()
    no_grad = _params([(7, 7)], grads=False)
    opt = torch.optim.SGD(with_grad + no_grad, lr=0.1)
    for p in with_grad:
        opt.state[p] = {k: torch.zeros_like(p, dtype=torch.bfloat16) for k in "mndg"}
        opt.state[p]["step_host_int"] = 3  # not a tensor: moves no bytes
    assert bs.step_bytes(opt) == 28 * N


def test_gpt2_layer_shapes_match_a_torch_transformer_layer():
    width, layers, vocab, ctx = 64, 3, 100, 32
    shapes = bs.gpt2_shapes(layers, width, vocab, ctx)
    layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width)
    per_layer = Counter(tuple(p.shape) for p in layer.parameters())
    expected = Counter({(vocab, width): 1, (ctx, width): 1, (width,): 2})
    for shape, count in per_layer.items():
        expected[shape] += layers * count
    assert Counter(shapes) == expected
    assert bs.numel(shapes) == vocab * width + ctx * width + layers * (12 * width**2 + 13 * width) + 2 * width


def test_gpt2_2048_is_the_1_3b_model():
    n = bs.numel(bs.MODELS["gpt2-2048"].shapes())
    assert 1.25e9 < n < 1.35e9
    assert 0.7e9 < bs.numel(bs.MODELS["gpt2-1536"].shapes()) < 0.8e9


def test_cpu_peak_memory_sees_a_known_temporary():
    # In a child process: the probe changes glibc's allocation settings for the whole process.
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(REPO_ROOT, 'tools')!r})
        import bench_step as bs
        probe = bs.CpuPeakMemory()
        if probe.reason:
            print("SKIP", probe.reason); sys.exit(0)
        big = torch.ones(8 * 2**20)            # resident before the measure: not counted
        junk = [torch.ones(2**16) for _ in range(200)]; del junk  # dirty the heap first
        def one_temporary():                   # 32 MiB
            t = big * 2; del t
        def many_small_alive():                # 200 x 256 KiB alive at once = 50 MiB
            ts = [big[:2**16] + 1 for _ in range(200)]; del ts
        def in_place():
            big.mul_(1.5)
        print("MIB", *(probe.measure(f) / 2**20 for f in (one_temporary, many_small_alive, in_place)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout)
    one, many, none = map(float, out.stdout.split()[1:])
    assert 31.5 <= one <= 34, one
    assert 49.5 <= many <= 53, many
    assert none < 1.0, none


def test_unavailable_and_failing_variants_become_na_rows():
    def refuse(params):
        raise bs.Unavailable("kernel not built here")

    def crash(params):
        raise RuntimeError("boom")

    variants = [bs.Variant("v-refuse", "refuses", refuse), bs.Variant("v-crash", "crashes", crash),
                bs.VARIANTS["ours-foreach"]]
    s = bs.Settings(device=torch.device("cpu"), warmup=1, repeats=4, min_repeats=4, max_seconds=60.0,
                    memory=False, rounds=2)
    rows = bs.run_model("tiny", bs.MODELS["tiny"].shapes(), variants, s, log=lambda *a: None)
    assert rows[0].reason == "kernel not built here"
    assert rows[1].reason == "RuntimeError: boom"
    assert rows[2].reason is None and len(rows[2].times) == 4  # 2 rounds x 2 steps
    assert rows[2].bytes == 44 * bs.numel(bs.MODELS["tiny"].shapes())
    table = bs.results_table(rows, _info("cpu", copy_gbps=10.0))
    assert "| refuses | n/a (kernel not built here) |" in table
    assert "| crashes | n/a (RuntimeError: boom) |" in table


def _info(kind, copy_gbps):
    return bs.RunInfo(device="test device", device_type=kind, date="today",
                      versions={"torch": "t", "timm": "t", "mmpretrain": "m", "python": "p",
                                "adan_plugin": "abc", "adan_plugin._C": "built"},
                      threads=2, load_before=(0, 0, 0), load_after=(0, 0, 0), copy_gbps=copy_gbps,
                      floor_detail="f", command="cmd", settings="s")


def _row(model, variant, ms, params=10**6, bytes_per_param=44):
    return bs.Row(model, variant, variant, times=[ms / 1e3], params=params, bytes=bytes_per_param * params)


def _by_text(targets):
    return {t.text: t for t in targets}


FP32 = "CPU, ResNet-50 shapes, fp32: ours fused ≤ 1.65× torch AdamW(fused=True) ms/step"
TIMM = "CPU, ResNet-50 shapes, fp32: ours fused ≥ 6× faster than timm Adan foreach"


def test_cpu_targets_are_judged_from_the_rows():
    info = _info("cpu", copy_gbps=10.0)
    met = _by_text(bs.evaluate_targets([_row("resnet50", "ours-fused", 20.0), _row("resnet50", "adamw-fused", 16.0),
                                        _row("resnet50", "timm-foreach", 130.0)], info))
    assert (met[FP32].verdict, met[TIMM].verdict) == ("met", "met")
    assert "1.25×" in met[FP32].detail and "6.50×" in met[TIMM].detail
    missed = _by_text(bs.evaluate_targets([_row("resnet50", "ours-fused", 30.0),
                                           _row("resnet50", "adamw-fused", 16.0),
                                           _row("resnet50", "timm-foreach", 130.0)], info))
    assert (missed[FP32].verdict, missed[TIMM].verdict) == ("not met", "not met")
    na = bs.Row("resnet50", "ours-fused", "x", reason="extension not built")
    targets = bs.evaluate_targets([na, _row("resnet50", "adamw-fused", 16.0)], info)
    assert {t.verdict for t in targets} == {"not evaluated"}
    none = _by_text(targets)
    assert "resnet50/ours-fused: n/a (extension not built)" in none[FP32].detail
    assert "resnet50/timm-foreach: not run" in none[TIMM].detail


def test_low_precision_state_targets_against_adamw_fused():
    # Issue 11: bf16 state ≤ 1.15x and 8-bit state ≤ 1.0x AdamW(fused=True), ResNet-50 and ViT-B shapes.
    rows = [_row("resnet50", "adamw-fused", 10.0), _row("resnet50", "ours-fused-bf16", 11.4),
            _row("resnet50", "ours-fused-8bit", 10.1),
            _row("vit_base_patch16_224", "adamw-fused", 30.0), _row("vit_base_patch16_224", "ours-fused-bf16", 35.0),
            bs.Row("vit_base_patch16_224", "ours-fused-8bit", "x", reason="kernel not built here")]
    got = _by_text(bs.evaluate_targets(rows, _info("cpu", copy_gbps=10.0)))
    text = "CPU, {} shapes, {}: ours fused ≤ {}× torch AdamW(fused=True) ms/step"
    bf16 = got[text.format("ResNet-50", "bf16 state", "1.15")]
    eight = got[text.format("ResNet-50", "8-bit state", "1.0")]
    assert (bf16.verdict, bf16.detail) == ("met", "11.40 / 10.00 ms = 1.14×")
    assert (eight.verdict, eight.detail) == ("not met", "10.10 / 10.00 ms = 1.01×")
    vit_bf16 = got[text.format("ViT-B/16", "bf16 state", "1.15")]
    vit_eight = got[text.format("ViT-B/16", "8-bit state", "1.0")]
    assert vit_bf16.verdict == "not met" and "1.17×" in vit_bf16.detail
    assert vit_eight.verdict == "not evaluated"
    assert vit_eight.detail == "vit_base_patch16_224/ours-fused-8bit: n/a (kernel not built here)"
    # No row of the baseline: not evaluated, and the missing row is named.
    alone = _by_text(bs.evaluate_targets([_row("resnet50", "ours-fused-bf16", 11.0)], _info("cpu", 10.0)))
    assert alone[text.format("ResNet-50", "bf16 state", "1.15")].detail == "resnet50/adamw-fused: not run"


def test_ratio_target_directions_and_metrics():
    look = {(r.model, r.variant): r for r in [_row("m", "a", 10.0, params=10**9), _row("m", "b", 20.0, params=10**9)]}
    assert bs.ratio_target(look, "t", "m", "a", "b", 0.5).verdict == "met"  # 10 / 20 = 0.5 ≤ 0.5
    assert bs.ratio_target(look, "t", "m", "a", "b", 0.4).verdict == "not met"
    assert bs.ratio_target(look, "t", "m", "b", "a", 2.0, at_least=True).verdict == "met"  # 20 / 10 ≥ 2
    assert bs.ratio_target(look, "t", "m", "b", "a", 2.1, at_least=True).verdict == "not met"
    # GB/s: a moves the same bytes in half the time, so at twice the bandwidth.
    fast = bs.ratio_target(look, "t", "m", "a", "b", 1.0, at_least=True, metric="gbps")
    assert fast.verdict == "met" and fast.detail == "4400 / 2200 GB/s = 2.00×"
    lacking = bs.ratio_target(look, "t", "m", "a", "c", 1.0)
    assert (lacking.verdict, lacking.detail) == ("not evaluated", "m/c: not run")


def test_ratio_targets_judge_paired_steps_when_there_are_some():
    # The rounds' medians say 1.30x, the steps timed back to back 1.10x: the paired ratio decides.
    row, base = _row("resnet50", "ours-fused-bf16", 13.0), _row("resnet50", "adamw-fused", 10.0)
    row.paired["adamw-fused"] = [1.05, 1.10, 1.12, 1.08, 1.40]
    got = bs.ratio_target({(r.model, r.variant): r for r in (row, base)}, "t", "resnet50", "ours-fused-bf16",
                          "adamw-fused", 1.15)
    assert got.verdict == "met"
    assert got.detail.startswith("step against step: median 1.10× of 5 paired steps")
    assert got.detail.endswith("rounds' medians 13.00 / 10.00 ms = 1.30×")
    row.paired["adamw-fused"] = [1.2, 1.3, 1.25]
    assert bs.ratio_target({(r.model, r.variant): r for r in (row, base)}, "t", "resnet50", "ours-fused-bf16",
                           "adamw-fused", 1.15).verdict == "not met"


def test_paired_ratios_time_both_variants_back_to_back():
    slow = bs.Variant("slow", "slow", lambda ps: _Sleeper(ps, 0.004))
    fast = bs.Variant("fast", "fast", lambda ps: _Sleeper(ps, 0.002))
    s = bs.Settings(device=torch.device("cpu"), warmup=1, repeats=6, min_repeats=6, max_seconds=60.0,
                    memory=False, rounds=1)
    bench = bs.Bench(bs.MODELS["tiny"].shapes(), s.device)
    rows = [bs.Row("tiny", "slow", "slow", times=[0.004]), bs.Row("tiny", "fast", "fast", times=[0.002]),
            bs.Row("tiny", "na", "na", reason="not built")]
    bs.paired_ratios(bench, [slow, fast, bs.Variant("na", "na", None)], rows, s,
                     pairs=(("slow", "fast"), ("na", "fast")), log=lambda *a: None)
    assert len(rows[0].paired["fast"]) == 6
    assert 1.5 < sorted(rows[0].paired["fast"])[3] < 2.5  # sleeps of 4 and 2 ms
    assert rows[2].paired == {}


class _Sleeper:
    def __init__(self, params, seconds):
        self.seconds = seconds

    def step(self):
        import time
        time.sleep(self.seconds)


def test_bytes_bound_is_reported_with_the_timm_target():
    fused, timm_fe = _row("resnet50", "ours-fused", 20.0), _row("resnet50", "timm-foreach", 100.0)
    fused.op_bytes, timm_fe.op_bytes = 44 * fused.params, 176 * timm_fe.params
    target = _by_text(bs.evaluate_targets([fused, _row("resnet50", "adamw-fused", 16.0), timm_fe],
                                          _info("cpu", copy_gbps=10.0)))[TIMM]
    assert target.verdict == "not met" and "5.00×" in target.detail
    # 176 / 44 B = 4x from bytes; the remaining 1.25x is timm running at 80% of our bandwidth.
    assert "176 / 44 B/param (4.00×" in target.detail and "(1.25×)" in target.detail


def test_op_bytes_counts_reads_writes_and_skips_views_and_write_only_destinations():
    from bench.measure import op_bytes

    a, b = torch.randn(1000), torch.randn(1000)
    half = torch.randn(1000, dtype=torch.bfloat16)
    idx = torch.empty(1000, dtype=torch.long)
    cases = [
        (lambda: a.add_(b), 12),                                    # read a, b; write a
        (lambda: torch.sqrt(a), 8),                                 # read a; write a fresh tensor
        (lambda: a.zero_(), 4),                                     # write only
        (lambda: a.copy_(b), 8),                                    # read b, write a
        (lambda: torch.add(a, b, out=a), 12),                       # out= is written, a read as input
        (lambda: a.view(10, 100), 0),                               # a view moves nothing
        (lambda: torch.empty_like(a), 0),                           # nor an unfilled allocation
        (lambda: torch._foreach_addcmul_([a], [b], [b]), 12),       # b passed twice, read once
        (lambda: half.float(), 6),                                  # 2 B read, 4 B written
        (lambda: torch.sort(b, out=(a, idx)), 16),                  # values/indices: written only
    ]
    for fn, per_element in cases:
        assert op_bytes(fn) == per_element * 1000
    # A broadcast operand is read once, not once per element of the view.
    broadcast = torch.ones(1).expand(1000)
    assert op_bytes(lambda: broadcast.clone()) == 4 + 4 * 1000


@pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")
def test_op_bytes_of_the_fused_step_is_one_pass_and_of_timm_several():
    from bench.measure import op_bytes

    counts = {}
    for variant in ("ours-fused", "ours-fused-bf16", "timm-foreach"):
        opt = bs.VARIANTS[variant].make(_params())
        opt.step()
        opt.step()
        counts[variant] = op_bytes(opt.step)
    assert counts["ours-fused"] == 44 * N
    assert counts["ours-fused-bf16"] == 28 * N
    assert counts["timm-foreach"] > 3 * counts["ours-fused"]


def test_gpu_copy_floor_target():
    params = 10**9
    # 44 GB in 50 ms = 880 GB/s against a 1000 GB/s copy: 88%.
    rows = [_row("gpt2-2048", "ours-fused", 50.0, params=params)]
    (floor, *_rest) = bs.evaluate_targets(rows, _info("cuda", copy_gbps=1000.0))
    assert floor.verdict == "met" and "88.0%" in floor.detail
    assert math.isclose(rows[0].gbps(), 880.0)


def test_cli_writes_its_section_and_keeps_the_other(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("old\n" + bs.SECTION_BEGIN.format(kind="cuda") + "\nGPU SENTINEL\n"
                   + bs.SECTION_END.format(kind="cuda") + "\n")
    rows = bs.main(["--device", "cpu", "--models", "tiny", "--variants", "ours-foreach,adamw-fused,ours-single",
                    "--repeats", "2", "--min-repeats", "1", "--warmup", "1", "--copy-mib", "4", "--rounds", "1",
                    "--no-memory", "--output", str(doc)])
    text = doc.read_text()
    assert text.startswith("# Optimizer-step benchmarks")
    assert "GPU SENTINEL" in text and text.count(bs.SECTION_BEGIN.format(kind="cpu")) == 1
    cpu = bs._extract(text, "cpu")
    for r in rows:
        line = next(ln for ln in cpu.splitlines() if ln.startswith(f"| {r.label} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[1]) > 0 and int(cells[3]) >= 1
        assert cells[4] == ("44.00" if r.variant.startswith("ours") else "28.01")
    assert "**not evaluated**" in cpu  # no ResNet-50 rows in this run
    # The compute probe, measured at the start, in each round and at the end: its spread in the run notes.
    probe = next(ln for ln in cpu.splitlines() if ln.startswith("- compute probe"))
    lo, hi, count = re.search(r"([\d.]+)–([\d.]+) ns per element over (\d+) measurements", probe).groups()
    assert 0 < float(lo) <= float(hi) and int(count) == 3
    png = tmp_path / "bench_step_cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second CPU run replaces the CPU section, not appends to it.
    bs.main(["--device", "cpu", "--models", "tiny", "--variants", "ours-foreach", "--repeats", "1",
             "--min-repeats", "1", "--warmup", "0", "--copy-mib", "4", "--rounds", "1", "--no-memory", "--output", str(doc)])
    text = doc.read_text()
    assert text.count("#### tiny") == 1 and "GPU SENTINEL" in text
    assert "torch AdamW fused" not in bs._extract(text, "cpu")


def test_cli_capped_to_an_instruction_set_runs_again_and_gets_its_own_section(tmp_path):
    # --cpu-isa base: our portable build and torch's default kernels, in a second process (the capability
    # is fixed once torch runs a kernel); recorded apart from the uncapped CPU section, which stays.
    if bs.best_cpu_isa() == "base":
        pytest.skip("this CPU has no vector build to cap")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(bs.SECTION_BEGIN.format(kind="cpu") + "\nCPU SENTINEL\n" + bs.SECTION_END.format(kind="cpu") + "\n")
    tool = os.path.join(bs.REPO_ROOT, "tools", "bench_step.py")
    env = {k: v for k, v in os.environ.items() if k not in ("ADAN_PLUGIN_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    proc = subprocess.run([sys.executable, tool, "--cpu-isa", "base", "--device", "cpu", "--models", "tiny",
                           "--variants", "ours-fused,adamw-fused", "--repeats", "1", "--min-repeats", "1",
                           "--warmup", "0", "--copy-mib", "4", "--rounds", "1", "--no-memory", "--output", str(doc)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = doc.read_text()
    assert "CPU SENTINEL" in bs._extract(text, "cpu")
    capped = bs._extract(text, "cpu-base")
    assert capped.startswith("### Run: CPU, kernels capped to BASE — ")
    kernels = next(ln for ln in capped.splitlines() if ln.startswith("- kernels: "))
    assert "adan_plugin CPU build base, torch CPU capability DEFAULT" in kernels
    assert f"this CPU's best build: {bs.best_cpu_isa()}" in kernels
    assert (tmp_path / "bench_step_cpu-base.png").exists()


def test_fused_temporary_target_compares_with_the_largest_parameter_tensor():
    rows = [bs.Row("resnet50", "ours-fused", "f", times=[0.01], params=10, bytes=440,
                   largest_tensor_bytes=8 * 2**20, peak_extra=2**17),
            bs.Row("convnext_tiny", "ours-fused", "f", times=[0.01], params=10, bytes=440,
                   largest_tensor_bytes=8 * 2**20, peak_extra=9 * 2**20)]
    verdicts = {t.text.split(",")[0]: t.verdict for t in bs.evaluate_targets(rows, _info("cpu", 10.0))
                if "temporary" in t.text}
    assert verdicts == {"resnet50": "met", "convnext_tiny": "not met"}


@pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")
def test_8bit_state_bytes_count_the_scales():
    # One 8-bit parameter (5000 elements: 20 blocks of 256, the last partial) and one small fp32-state one.
    opt = bs.VARIANTS["ours-fused-8bit"].make(_params([(5000,), (5,)]))
    opt.step()
    big = 5000 * 4 + 4 * 4 * 20  # four 1-byte codes + four fp32 scales per block
    small = 4 * 4 * 5
    assert bs.state_bytes(opt) == big + small
    assert bs.step_bytes(opt) == 3 * 4 * 5005 + 2 * (big + small)


# ------------------------------------------------------------------ official FusedAdan, issue 13
FAKE_OFFICIAL = textwrap.dedent("""
    import torch

    class Adan(torch.optim.SGD):
        # Stands in for sail-sg/Adan's class: same constructor keywords, four named states.
        def __init__(self, params, lr, betas, eps, weight_decay, max_grad_norm=0.0, no_prox=False,
                     foreach=True, fused=False):
            self.made_with = dict(foreach=foreach, fused=fused, betas=betas)
            super().__init__(params, lr=lr)

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state[p]
                    for name in ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"):
                        st.setdefault(name, torch.zeros_like(p))
                    p.add_(p.grad, alpha=-group["lr"])
""")


@pytest.fixture
def official_path(tmp_path):
    (tmp_path / "adan.py").write_text(FAKE_OFFICIAL)
    bs.OfficialAdan.set_path(str(tmp_path))
    yield str(tmp_path)
    bs.OfficialAdan.set_path(None)


def test_official_variants_are_na_without_a_path_or_when_the_import_fails(tmp_path):
    bs.OfficialAdan.set_path(None)
    for name in ("official-fused", "official-fused-single"):
        with pytest.raises(bs.Unavailable, match="no --official-adan path given"):
            bs.VARIANTS[name].make(_params())
    (tmp_path / "adan.py").write_text("import fused_adan_not_built_here\n")
    bs.OfficialAdan.set_path(str(tmp_path))
    try:
        s = bs.Settings(device=torch.device("cpu"), warmup=1, repeats=2, min_repeats=1, max_seconds=60.0,
                        memory=False)
        rows = bs.run_model("tiny", bs.MODELS["tiny"].shapes(), [bs.VARIANTS["official-fused"]], s,
                            log=lambda *a: None)
        assert "ModuleNotFoundError" in rows[0].reason and "fused_adan_not_built_here" in rows[0].reason
        # Its source folder without the built extension imports as an empty namespace package.
        (tmp_path / "adan.py").write_text(FAKE_OFFICIAL)
        (tmp_path / "fused_adan").mkdir()
        (tmp_path / "fused_adan" / "fused_adan_kernel.cu").write_text("")
        bs.OfficialAdan.set_path(str(tmp_path))
        with pytest.raises(bs.Unavailable, match="fused_adan extension not built in"):
            bs.VARIANTS["official-fused"].make(_params())
        bs.OfficialAdan.set_path(str(tmp_path / "missing"))
        with pytest.raises(bs.Unavailable, match="no adan.py"):
            bs.VARIANTS["official-fused"].make(_params())
    finally:
        bs.OfficialAdan.set_path(None)


def test_official_variants_load_adan_py_from_the_path_and_run(official_path, tmp_path):
    opt = bs.VARIANTS["official-fused"].make(_params())
    assert opt.made_with == dict(foreach=True, fused=True, betas=bs.ADAN_HP["betas"])
    assert bs.VARIANTS["official-fused-single"].make(_params()).made_with["foreach"] is False
    opt.step()
    assert bs.step_bytes(opt) == 44 * N  # p, g and its four fp32 states
    doc = tmp_path / "benchmarks.md"
    rows = bs.main(["--device", "cpu", "--models", "tiny", "--variants", "official-fused,official-fused-single",
                    "--repeats", "2", "--min-repeats", "1", "--warmup", "1", "--copy-mib", "4", "--rounds", "1",
                    "--no-memory", "--no-write", "--official-adan", official_path])
    assert [r.reason for r in rows] == [None, None] and all(len(r.times) >= 1 for r in rows)
    assert all(r.op_bytes is None and r.bytes == 44 * r.params for r in rows)  # extension call: not counted
    table = bs.results_table(rows, _info("cpu", 10.0))
    assert "| official FusedAdan (sail-sg, multi-tensor) | " in table
    assert "| official FusedAdan (sail-sg, single-tensor) | " in table
    assert not doc.exists()


def test_readme_form_table_has_peak_mb_and_200_step_times():
    n = 25 * 10**6
    rows = [bs.Row("resnet50", "adamw-fused", "a", times=[0.004], params=n, state_bytes=8 * n, peak_extra=10**6),
            bs.Row("resnet50", "ours-foreach", "b", times=[0.010], params=n, state_bytes=16 * n, peak_extra=4 * n),
            bs.Row("resnet50", "ours-fused", "c", times=[0.005], params=n, state_bytes=16 * n, peak_extra=0),
            bs.Row("resnet50", "official-fused", "d", reason="no --official-adan path given", params=n)]
    assert bs.peak_mb(rows[0]) == 8 * 25 + 8 * 25 + 1
    lines = bs.readme_table(rows).splitlines()
    assert lines[0].startswith("| Model | Model size (M params) | AdamW fused peak (MB) | ours unfused peak (MB) |")
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells == ["resnet50", "25.0", "401", "700", "600", "n/a", "800.0", "2000.0", "1000.0", "n/a"]
    # The section carries it with its definition.
    text = bs.section(rows, _info("cuda", 1000.0), chart=None)
    assert "**peak MB** here = fp32 parameters + fp32 gradients" in text and lines[2] in text


OFFICIAL_1536 = "GPU, gpt2-1536 shapes: ours fused ≤ 0.75× official FusedAdan ms/step"
OFFICIAL_2048 = "GPU, gpt2-2048 shapes: ours fused ≤ 0.75× official FusedAdan ms/step"


def test_gpu_targets_against_the_official_fused_adan():
    rows = [_row("gpt2-1536", "ours-fused", 30.0), _row("gpt2-1536", "official-fused", 50.0),
            _row("gpt2-2048", "ours-fused", 45.0), _row("gpt2-2048", "official-fused", 50.0)]
    got = _by_text(bs.evaluate_targets(rows, _info("cuda", 1000.0)))
    assert (got[OFFICIAL_1536].verdict, got[OFFICIAL_2048].verdict) == ("met", "not met")
    assert "0.60×" in got[OFFICIAL_1536].detail and "0.90×" in got[OFFICIAL_2048].detail
    rows[3] = bs.Row("gpt2-2048", "official-fused", "x", reason="no --official-adan path given")
    got = _by_text(bs.evaluate_targets(rows, _info("cuda", 1000.0)))
    assert got[OFFICIAL_2048].verdict == "not evaluated"
    assert "gpt2-2048/official-fused: n/a (no --official-adan path given)" in got[OFFICIAL_2048].detail
    assert OFFICIAL_1536 not in _by_text(bs.evaluate_targets(rows, _info("cpu", 10.0)))


def test_gpu_bf16_state_targets_judge_each_backend_against_adamw():
    rows = [_row("gpt2-2048", "ours-fused-bf16", 14.3), _row("gpt2-2048", "ours-fused-triton-bf16", 12.6),
            _row("gpt2-2048", "adamw-fused", 14.0)]
    got = _by_text(bs.evaluate_targets(rows, _info("cuda", 1000.0)))
    cuda = got["GPU, gpt2-2048 shapes: ours fused bf16 state no slower than torch AdamW(fused=True) fp32"]
    triton = got["GPU, gpt2-2048 shapes: ours fused bf16 state, Triton kernel, no slower than torch AdamW(fused=True) "
                 "fp32"]
    assert (cuda.verdict, triton.verdict) == ("not met", "met")
    assert "0.90×" in triton.detail


def test_gpu_peak_beyond_states_target_is_one_percent_of_the_parameters():
    n = 10**6  # 4 MB of fp32 parameters: the limit is 40 000 bytes
    rows = [bs.Row("resnet50", "ours-fused", "f", times=[0.01], params=n, bytes=44 * n, peak_extra=40_000),
            bs.Row("resnet50", "ours-fused-bf16", "b", times=[0.01], params=n, bytes=28 * n, peak_extra=40_001),
            bs.Row("vit_small_patch16_224", "ours-fused", "f", times=[0.01], params=n, bytes=44 * n),
            bs.Row("vit_small_patch16_224", "ours-fused-bf16", "b", reason="extension not built")]
    got = {t.text: t.verdict for t in bs.evaluate_targets(rows, _info("cuda", 1000.0)) if "≤ 1% of" in t.text}
    assert got == {
        "GPU, resnet50, ours-fused: peak memory beyond states ≤ 1% of the parameters' size": "met",
        "GPU, resnet50, ours-fused-bf16: peak memory beyond states ≤ 1% of the parameters' size": "not met",
        "GPU, vit_small_patch16_224, ours-fused: peak memory beyond states ≤ 1% of the parameters' size":
            "not evaluated",
        "GPU, vit_small_patch16_224, ours-fused-bf16: peak memory beyond states ≤ 1% of the parameters' size":
            "not evaluated",
    }
    assert not [t for t in bs.evaluate_targets(rows, _info("cpu", 10.0)) if "≤ 1% of" in t.text]


def test_default_models_per_device():
    args = bs.parse_args([])
    assert args.official_adan is None and args.compile_models is None
    cpu = [m for m, spec in bs.MODELS.items() if m != "tiny" and spec.cpu_default]
    assert cpu == ["resnet50", "vit_base_patch16_224", "convnext_tiny"]
    gpu = [m for m in bs.MODELS if m != "tiny"]
    assert sorted(gpu) == sorted(cpu + ["resnet101", "vit_small_patch16_224", "gpt2-1536", "gpt2-2048"])
    assert 21e6 < bs.numel(bs.MODELS["vit_small_patch16_224"].shapes()) < 23e6
    assert 44e6 < bs.numel(bs.MODELS["resnet101"].shapes()) < 45e6


@pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")
def test_ours_fused_rows_name_the_compiled_kernel():
    # fused=True alone would put Triton first for 8-bit states on a GPU; the "ours fused" rows time our
    # compiled kernels, so they name the device's backend (Triton has its own rows).
    params = [torch.nn.Parameter(torch.randn(5000))]
    for name in ("ours-fused", "ours-fused-bf16", "ours-fused-8bit"):
        opt = bs.VARIANTS[name].make(params)
        assert [g["fused_backend"] for g in opt.param_groups] == ["cpu"], name
    assert bs.VARIANTS["ours-foreach"].make(params).param_groups[0]["fused_backend"] is None


def test_the_committed_page_starts_with_the_tools_header():
    # bench_step rewrites docs/benchmarks.md from bench/doc.py's HEADER and its sections: text edited into
    # the page's header instead of HEADER would vanish at the next run.
    with open(os.path.join(REPO_ROOT, "docs", "benchmarks.md")) as f:
        page = f.read()
    assert page.split("\n\n## Results")[0] == bs.HEADER
