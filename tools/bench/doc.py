"""docs/benchmarks.md: its header, one section per device type (rewritten in place), and the bar chart."""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from bench.report import RunInfo
from bench.run import Row


HEADER = """# Optimizer-step benchmarks

Produced by `tools/bench_step.py`; every number on this page comes from one run of it, on the device named
in that run's section.  Re-run it to refresh a section (the other device's section is kept).

## What is measured

- **ms/step**: median over the timed steps of one `optimizer.step()` on parameters with the shapes of the
  named model (one tensor per parameter, fp32, random values, fixed random gradients), after warm-up steps
  (states allocated, `torch.compile` done).  CPU: `time.perf_counter` around each step; CUDA: CUDA events.
  Every variant runs on its own copy of the parameters.  On the CPU the variants are timed round-robin in
  three rounds (each round builds the optimizer afresh and warms it up; a compiled step is compiled once),
  so that load from other processes on a shared machine spreads over all variants; the median is over the
  steps of all rounds and min–max shows the spread.
- **B/param**: the bytes one step must move at least, divided by the parameter count:
  `Σ_p [2·|p| + |g| + 2·Σ_{s ∈ state[p]} |s|]`, where `|t|` = numel × element size: each parameter
  is read and written, its gradient read, and each state tensor read and written.  It is counted from the
  tensors the optimizer actually holds after its steps, so for fp32 parameters:
  - Adan, fp32 state (ours, timm, mmpretrain): 4 + 4 (p) + 4 (g) + 2 × 4 × 4 (exp_avg, exp_avg_sq,
    exp_avg_diff, neg_pre_grad / pre_grad) = **44 B**;
  - ours fused, bf16 state: 8 + 4 + 2 × 4 × 2 = **28 B**;
  - AdamW: 8 + 4 + 2 × 2 × 4 = **28 B**, plus 8 B per parameter *tensor* for its fp32 `step` tensor
    (shown as the fraction above 28).
  Unfused implementations move more than this (extra passes, temporaries); the column is what the
  algorithm needs, the same for every implementation of it, so GB/s compares implementations.
- **ops' B/param**: the bytes the step's ops actually read and write, divided by the parameter count,
  counted during one extra (untimed) step by a `TorchDispatchMode` (`tools/bench/measure.py::OpBytes`)
  from each op's schema: every tensor argument read once per op, every argument the schema marks mutable
  and every fresh output written; views and unfilled allocations count nothing.  On tensors far larger
  than the caches every op streams its operands from memory, so this is each implementation's memory
  traffic: ours fused is one op and one pass (44 B per fp32 parameter), a `_foreach_*` chain the sum of
  its passes.  An op that declares more than it touches counts what it declares: torch's
  `_fused_adamw_` marks its gradients mutable, hence 32 instead of 28.  Not shown for the compiled
  step, whose inductor kernels are not dispatched ops.
- **GB/s**: B/param × parameters / median step time ("effective bandwidth").
- **% of floor**: GB/s divided by the streaming bandwidth floor measured on the same device in the same run,
  timed the same way: the fastest of `dst.copy_(src)` (2 × size moved) and in-place `a.add_(b)` (3 × size)
  on large fp32 tensors, measured at the start, once per model and round, and at the end (the fastest
  measurement counts, so load from other processes lowers rather than flatters the percentages).  On a CPU
  the in-place add is the faster one: a copy's write-only destination costs an extra read for ownership
  that the optimizers' in-place updates do not pay.  A step that moved its bytes as fast as that would
  reach 100%; an unfused step whose per-tensor passes stay in cache can exceed it on small tensors.
- **compute probe** (CPU runs, in the run notes): `torch.exp` on 2^20 fp32 elements, which stay in cache,
  timed whenever the floor is, as ns per element.  A step bound by arithmetic (8-bit states on a CPU)
  slows down when other guests share the host's cores, a memory-bound one much less, so a probe that
  spread widely over a run (max/min well above 1) marks ratios between such steps as moved by the host.
- **kernels** (CPU runs, in the run notes): the build of our CPU kernels that ran (`base`, `avx2`,
  `avx512`, `avx512_bf16`: the best the CPU has, picked at run time) and torch's CPU capability, which
  runs `AdamW(fused=True)`.  `--cpu-isa avx2` caps both (`ADAN_PLUGIN_CPU_ISA`, `ATEN_CPU_CAPABILITY`) to
  what a CPU with only AVX2 runs, so the AVX2 code paths of both are timed on this machine; such a run
  gets its own section (`cpu-avx2`).  It measures the code an AVX2-only CPU would run, not such a CPU:
  the cores, clock and memory are still this machine's.
- **state MiB**: the optimizer state tensors.  **peak MiB beyond states**: memory one step allocates on top
  of parameters, gradients and states, i.e. its temporaries.  CUDA: `torch.cuda.max_memory_allocated()`
  during the step minus `memory_allocated()` before it.  CPU: the process's resident-set high-water mark
  (`VmHWM`, reset through `/proc/self/clear_refs` just before the step) minus its resident set before the
  step, measured after all timings with glibc told to give every allocation of 64 KiB or more its own
  `mmap` and to return freed memory immediately (`mallopt`, `malloc_trim`), so a temporary shows up as
  resident memory instead of silently reusing already-resident heap pages.  Allocations under 64 KiB can
  escape it.  mmpretrain's Adan keeps a fresh copy of every gradient each step, which shows up here.
- Hyper-parameters: Adan lr 1e-3, betas (0.98, 0.92, 0.99), eps 1e-8, weight decay 0.02, proximal decay,
  no gradient clipping (timm's Adan has none); AdamW lr 1e-3, weight decay 0.02.

## Variants

| variant | what |
|---|---|
| ours fused (fp32 / bf16 state) | `adan_plugin.Adan(fused=True)` / `Adan(fused=True, state_dtype=torch.bfloat16)`: one pass over memory in `adan_plugin._C` |
| ours fused, 8-bit state | `Adan(state_dtype="8bit")`: 1-byte states + an fp32 scale per 256 elements (tensors ≥ 4096 elements; smaller ones fp32), quantized in the same pass; state MiB and B/param count the scales |
| ours foreach / single-tensor | `Adan(foreach=True / False, fused=False)`: `torch._foreach_*` ops / a loop of per-tensor ops |
| ours foreach, torch.compile | `torch.compile(opt.step)` on `Adan(foreach=True, fused=False)`; compile time shown, not timed |
| timm Adan foreach / single-tensor | `timm.optim.Adan(foreach=True / False)` |
| mmpretrain Adan | `mmpretrain.engine.optimizers.Adan` with its default `foreach=True` |
| official FusedAdan (multi-tensor / single-tensor) | sail-sg/Adan's `Adan(foreach=True / False, fused=True)` with its `fused_adan` CUDA extension, loaded from the directory given by `--official-adan PATH` (its code is never part of this repository); "n/a" without the option or when it does not import.  Its kernel is an extension call, not a torch op, so ops' B/param is not counted |
| torch AdamW fused / foreach | `torch.optim.AdamW(fused=True)` / `(foreach=True)` |

Models: parameter shapes of timm `resnet50`, `vit_base_patch16_224`, `convnext_tiny` (the CPU default),
`resnet101` and `vit_small_patch16_224` (the seed table's other models; added by default on a GPU), all
built with `pretrained=False` on the meta device, and GPT-2 as in the table of the official Adan fused-kernel
README:
24 layers, width 1536 or 2048, vocabulary 49280, sequence length 2048 (token embedding tied to the output
head, position embedding of 2048 rows; per layer two LayerNorms, qkv, attention projection, fc (4× width),
fc2, each Linear with a bias; a final LayerNorm).  GPT-2 runs on a GPU by default: with ~0.76 B / 1.3 B
parameters its Adan state alone is 12 / 21 GB in fp32, more than a shared 24 GiB CPU machine can hold for
every variant (`--models gpt2-1536` on a CPU runs it if memory allows, otherwise its rows say why not).
On the CPU the `torch.compile` variant runs on ResNet-50 shapes only by default (`--compile-models`):
compiling takes minutes on two cores; on a GPU it runs only on the models `--compile-models` names.  Our
step count is a Python int, so dynamo compiles three graphs (first step, second step, then a dynamic step
count) before the step settles; the tool warms up until a step compiles nothing new.

Reading CPU numbers from a shared machine: torch runs each op with its intra-op thread pool, and an op
split over two threads waits for both.  When other processes keep the cores busy, every parallel region
can wait a scheduler time slice for its second thread (seen here: `sqrt` of a 4096-element tensor took
about 10 ms with two threads under load, 2 µs with one), so implementations that issue many ops per step
(single-tensor and foreach paths: over a thousand on these models) slow down far more than a one-pass
kernel (ours fused: one parallel region per step).  Each run states its load average; compare ratios within a run only.

Targets: each run's section judges them from that run's rows only (`tools/bench/report.py`,
`evaluate_targets`; a target whose rows are missing says which and why).  Against torch's
`AdamW(fused=True)` in ms/step on the CPU (issue 11): ours fused ≤ 1.65× with fp32 state (ResNet-50
shapes), ≤ 1.15× with bf16 state and ≤ 1.0× with 8-bit state (ResNet-50 and ViT-B/16 shapes; 8-bit moves
fewer bytes).  Also: 8-bit state ≤ 4.5 B/param, no parameter-sized temporary in any fused variant, and the
timm target below.  On a GPU (issue 13): ours fused ≥ 85% of the copy bandwidth floor on GPT-2-1.3B shapes;
ours fused ≤ 0.75× the official FusedAdan's (multi-tensor) ms/step on both GPT-2 shapes; ours fused with
bf16 state ≤ 1.0× `AdamW(fused=True)` on both GPT-2 shapes; and, for ours fused with fp32 and bf16 state on
every model, peak memory beyond states ≤ 1% of the parameters' size (fp32, 4 B per parameter).  The CPU
ratios against AdamW are judged *step against step*: after the rounds, each of our fused variants and
`AdamW(fused=True)` are built side by side and stepped alternately (order swapped every pair), and the target takes the median of the per-pair time ratios (quartiles shown, with the
ratio of the rounds' medians for comparison).  Two runs of the rounds alone, minutes apart on the shared
development machine, gave 1.01× and 1.33× for the same bf16-state ResNet-50 code: the rounds time each
variant in different seconds, and load that comes and goes (other processes, other guests of the host)
lands on one more than the other; two steps back to back see the same load.

Why the 8-bit-state target (≤ 1.0× `AdamW(fused=True)`) is not met on the AMD EPYC (Zen 4) machine: there
the 8-bit step is bound by its vector instructions, not by memory.  It moves 20 B per parameter against
AdamW's 28, but each element is dequantized (four states), updated (a square root and a division), its
block maxima tracked and requantized (an rsqrt estimate settled against exact level thresholds,
csrc/README.md): about 110 512-bit instructions per 16 elements, and Zen 4, which splits each into two
256-bit halves, sustained about 1.5 of them per cycle in every mix we timed (its multiply/FMA/compare and
its add/convert/round pipes each take one 512-bit instruction per cycle).  Measured in L2 on one core
(compute only; the op called on 65536 elements, ns per element): 8-bit state 1.49, bf16 state 0.67–0.74, torch's
fused AdamW 0.46; the 8-bit step cannot stream faster than its arithmetic, whatever the bandwidth.  The
first rewrite of this kernel (quantizer without square roots on the divider, dequantizing in registers,
maxima during the update) took it from 4.3× to about 1.7× AdamW on ResNet-50 shapes; the second (2.04 →
1.53 ns per element: the update's own sqrt(n) reused for exp_avg_sq's code, one comparison per level
instead of two, and a shorter quantizer for blocks whose values are all finite) to 1.2–1.4× on ResNet-50
and ViT-B/16 shapes; a third step (the level increment and the sign applied to the code bytes) saved
another 2–3% (1.49 ns per element), a fourth (one finiteness sum per block over the new parameters, which
every NaN state reaches, instead of one per state) another 2.5% (1.23 → 1.19 ns per element in a
one-core harness at 32768 elements; that harness's betas were by mistake (0.02, 0.08, 0.01), which take
lerp's second formula: with the default betas it measures 1.15–1.26 ns per element on 2026-11-27, before
and after a fifth step, which picks lerp's formula once per call instead of once per vector and saves
AVX-512 nothing measurable).  Timed alone, the four quantizers take about 8 cycles per 16 values
and state, and dropping any single instruction saves 0.2–1.1 cycles, so only fewer instructions would
help.  Tried and dropped, each measured no faster: software prefetch one to eight blocks ahead, writing a
block's codes while the next block updates (to overlap the divider), 256-bit vectors, an integer
threshold comparison and a sign-bit settle instead of the mask comparison; skipping the multiplications
by 1 (no clipping, proximal decay) saved under 3%.  Also dropped (2026-11-27, one-core harness, 32768
elements, default betas: 4.15–4.19 cycles per element at 3.66 GHz): a quantizer that takes the level's
floor from one FMA rounded toward −∞ onto 2²³ (c0 = floor(v·rsqrt14(v)) lands in the low byte of the
float's bits, so no round, no float-to-int conversion, and the threshold is (f − (2²³ − ½))²; the same codes
as the spec for every fp32 v in [0, cmax²], checked exhaustively): 7.9 → 7.05 cycles per 16 values and
state timed alone, but 4.17–4.44 cycles per element inside the step, no faster; with the multiplications
by 1 skipped as well, 3.95–4.04 (−4%, inside the harness's run-to-run spread of codegen and layout
effects).  The multiplications by 1 skipped alone, as a template variant of the 8-bit loop chosen per call
when clipping, AMP and decoupled decay are off: the op timed from Python 2% faster on the AVX2 build and
no faster on AVX-512, for a 21% larger library and half again the CPU build time; not kept.  Removing the block maxima (4 instructions per 16 elements) saves about 3%, the dequantizing
multiplications by |c| (6) 6%: the step pays for every instruction, and 1.0× AdamW needs about 25 fewer
per 16 elements.

How far the target is: AdamW's op takes 0.47–0.54 ns per element on two threads at 25M elements (bound
by memory), so the 8-bit op, which scales about 1.85× on the two cores, would need about 0.9 ns per
element on one core at that size, where it takes 1.3: some 30% fewer instructions.  The largest saving
found is another map, not adopted: float-like codes (sign, 4-bit exponent, 3-bit mantissa below the
block's scale, converted with vcvtps2ph / vcvtph2ps and a few 16-bit integer operations) took the
one-core harness from 1.21 to 0.93 ns per element (23% less) and the step to 1.25× AdamW on ResNet-50
shapes (step against step, in a run of its own; the square map's run before it: 1.36×), still above 1.0,
while it would change the checkpoint format, every kernel (CPU, CUDA, Triton) and the accuracy profile
(3 mantissa bits: up to 6% relative error at any magnitude, where the square map errs by at most 1.1% at
half the block's maximum); the same map built from integer bit operations instead of the conversion
instructions measured no faster (0.97).  Python's part of a step is not the difference: with the kernels
replaced by no-ops, a ResNet-50 step (161 tensors) takes 0.55 ms in our `step()` and 0.51 ms in
`AdamW(fused=True).step()`.

The ratio moves with the host: AdamW streams and the 8-bit step computes, so when other guests load the
host's cores (likely the other hardware thread of each physical core; the guest sees no steal time) the
8-bit step slows and AdamW barely does, and when they load its memory AdamW slows and the 8-bit step
barely does.  Runs of this page on the same machine gave 1.16–1.80× on ResNet-50 shapes and 1.24–1.80×
on ViT-B/16 shapes (ResNet-50: 1.79× and 1.80× in two runs at 01:35 and 01:41 UTC on 2026-11-27, between
which the 8-bit op alone took 1.36 ns per element on two threads and 0.69 a minute later; 1.16× in an
earlier run of this page, where ViT-B/16 gave 1.80× step against step and 1.24× by the rounds' medians;
measured apart at 04:03 UTC, AdamW's ViT-B/16 step took 34.1 ms, 71 GB/s, and the 8-bit one 59.2 ms:
1.78×).  The run below (10:08 UTC) caught AdamW at its fastest on this machine (10.5 ms per ResNet-50
step, 0.41 ns per element): 8-bit states 1.36× and 1.98× step against step (rounds' medians 1.85× and
1.39×), bf16 states 1.03× and 1.10× (met).  On a CPU with
full-width AVX-512 units and half this machine's memory bandwidth (the Intel Xeon the issue quotes: AdamW
26.5 ms per ResNet-50 step, 2.5× slower than here) the balance shifts towards memory; no run there
exists yet, only a prediction (next paragraph).

**Predicted, not measured: the Intel Xeon.** `tools/cpu_loop_model.py` takes the built kernels' inner
loops from the disassembly and simulates them with llvm-mca (LLVM 14; its newest scheduling models are Ice
Lake-SP, which `sapphirerapids` reuses, and Zen 3) on one core, operands in L1; `--measure` times the same builds on the host core for comparison (one
thread, in L2, per-call cost excluded by timing two sizes).  Run on 2026-11-27 on this AMD EPYC (Zen 4,
3.66 GHz measured with a dependent-add loop):

| llvm-mca model | build | state | update loop (cycles/el) | quantizers (cycles/el) | total (cycles/el) | measured here, ns/el (cycles/el at 3.66 GHz) |
|---|---|---|---|---|---|---|
| icelake-server (skylake-avx512: the same) | avx512 | bf16 | 1.66 | | 1.66 | 0.675–0.694 (2.5) |
| icelake-server (the same), bf16 loads by permutation and unpacks (csrc/README.md) | avx512 | bf16 | 1.51 | | 1.51 | 0.60–0.70 (2.2–2.6) |
| icelake-server | avx512 | 8-bit | 1.72 | 2.16 | 3.88 | 1.20–1.21 (4.4) |
| znver3 | avx2 | bf16 | 6.13 | | 6.13 | 0.970–0.978 (3.6) |
| znver3 | avx2, bf16 loads as above | bf16 | 5.31 | | 5.31 | 0.874–0.885 (3.2) |
| znver3 | avx2 | 8-bit | 3.52 | 2.56 | 6.08 | 1.64–1.66 (6.0) |
| znver3 | avx2 (signed quantizer on 2²³, below) | 8-bit | 3.42 | 2.45 | 5.87 | 1.61–1.64 (5.9–6.0) |

How far the model can be trusted: on the AVX2 build, whose 256-bit instructions Zen 4 executes as a Zen 3
does, it gives the 8-bit loop's cost to 2% (6.08 against 6.0 cycles per element) but overestimates the
bf16 one by 70% (it stalls that loop on a dependency the core does not wait for); on the AVX-512 build no
Intel core exists to check it against.  Taken at its word, on the issue's Xeon (AdamW: 26.5 ms per
ResNet-50 step, 1.04 ns per element on two threads, 27 GB/s for its 28 B per element): the 8-bit step's
20.2 B per element need 0.75 ns at that bandwidth, and its arithmetic, 3.9 cycles per element per core
(Ice Lake-SP executes a 512-bit instruction whole on its ports 0 and 5, where Zen 4 splits it in two
halves: 4.4 here) plus the per-block work the model leaves out, about 2.1 cycles of wall time per element
on two cores, fits in 1.04 ns when the cores hold at least about 2.1 GHz under AVX-512: then the step is
bound by memory at about 0.72× AdamW and the ≤ 1.0× target holds there; a Skylake-SP-class Xeon that
drops to 2 GHz or below under AVX-512 would land near 1.0×.  The bf16 step, 1.51 cycles per element
(0.4 ns of wall time on two cores at 2 GHz), stays bound by the same 28 B per element as AdamW: about
1.0×, inside its 1.15× target.  These stay predictions until a run on such a CPU replaces them.

CPUs with AVX2 but not AVX-512 (AMD EPYC before Zen 4, older Xeons) run the `avx2` build: the section
`cpu-avx2` times it on this machine with torch's kernels capped likewise (`--cpu-isa avx2`: the code an
AVX2-only CPU runs, on this machine's cores and memory).  Before this revision that build was far behind
the AVX-512 one: on ResNet-50 shapes, in a quick step-against-step comparison on 2026-11-27 at 02:58 UTC
(other work on the machine), 8-bit states 3.10×, bf16 states 1.42×, fp32 1.38× AdamW.  Counted by
callgrind on one core (32768 elements, instructions per element), the 8-bit loop took 27.2: its quantizer
was the portable one, clamped for NaN in every block, its block maxima propagated NaN at 4 instructions
per vector, tail tests ran in every group and lerp's formula was chosen per vector (sixteen 256-bit
registers spill what 32 512-bit ones hold).  It now has the AVX-512 build's structure (one finiteness sum
per block, a plain maximum, a finite quantizer on int32 levels packed by their low bytes, whole groups
with a constant count): 17.1; bf16 states 9.9 → 8.4 (the formula per call, and bf16 stores without the
conversion's NaN test when the group's parameters hold no NaN, which every NaN state reaches), fp32 4.3 →
3.8.  In that revision's run (04:00 UTC): bf16 states 1.11× on ResNet-50 (met) but 1.36× on ViT-B/16
step against step (rounds' medians 1.10×; measured apart at 04:02 UTC 1.46×, AdamW's step then at 75
GB/s: there the AVX2 bf16 step, 8.4 instructions per element, does not keep up with the memory), 8-bit
states 1.57× and 1.64×, fp32 1.47×.  Since then the signed 8-bit maps' quantizer of this build reads its
level estimate off an FMA rounded onto 2²³ (csrc/README.md): 6.1 → 5.6 cycles per element for the 8-bit
loop in a one-core harness.  Two runs of this section at 08:24 UTC, 5 minutes apart on a loaded host,
gave 2.25× and 1.79× step against step for 8-bit states, 1.48× and 1.12× for bf16 states, then 1.67×
and 2.36×, 1.12× and 1.51×.  Since then bf16 loads take a permutation and two unpacks instead of ATen's
conversion (csrc/README.md): the AVX2 bf16 op on one thread 0.97–1.00 → 0.87–0.89 ns per element.  The
section's run below (10:12 UTC) again met AdamW at its fastest (10.2 ms per ResNet-50 step, 32.5 ms per
ViT-B/16 step: 0.40 and 0.38 ns per element), where the AVX2 bf16 step does not keep up: bf16 states 1.41×
and 1.45× (not met), 8-bit 2.25× and 2.49×, fp32 1.45× (met).  That step is bound by its integer
conversion instructions, not by memory or the divider: on one thread (ns per element, timing-only
builds, 2026-11-27) fp32 states take 0.48–0.51 and bf16 states 0.88–0.90; bf16 stores truncated instead
of rounded (three fewer instructions per vector: the rounding's shift, mask and add) 0.66; the square
root and division replaced by multiplications 0.73–0.77.  Rounding to nearest even needs those
instructions on AVX2 (no conversion instruction), and a sequence without the shift (mask, compare,
subtract) measured no faster (0.91–0.92).  With AdamW's step slower (quick paired runs at about 09:55
UTC, AdamW at 14.7–15.1 ms per ResNet-50 step), the same AVX2 bf16 code gave 1.06–1.07× on ResNet-50 and
1.01× on ViT-B/16: the target holds or fails with the host's memory speed on this CPU.

Why the CPU target "ours fused ≥ 6× faster than timm's Adan foreach" (ResNet-50 shapes, fp32) is out of
reach: on these model sizes the steps are bound by memory bandwidth, not by arithmetic (ours fused runs at
the GB/s of `AdamW(fused=True)`, close to the floor), so the time ratio of two steps is the ratio of the
bytes their ops move times the ratio of the bandwidths they reach.  timm's foreach step is 16
`_foreach_*` ops whose operands add up to 164 B per fp32 parameter (ops' B/param column) against our 44 B:
3.7× at equal bandwidth, which no implementation keeping Adan's four fp32 states can beat.  Beyond that
only timm's own inefficiency helps: its many short ops reach less bandwidth than one long pass, the more
so under load (see above), and 6× needs it to reach at most 62% of ours.  The target row splits each run's
ratio into those two factors.  6× at equal bandwidth would need at most 27 B per parameter, about what
the bf16-state fused step moves (28 B).
"""

SECTION_BEGIN = "<!-- bench_step:{kind}:begin -->"
SECTION_END = "<!-- bench_step:{kind}:end -->"
PLACEHOLDER = {
    "cpu": "### Run: CPU\n\nNo CPU run recorded yet.",
    "cuda": "### Run: CUDA\n\nNo GPU run recorded (the machine these results come from has no GPU): no GPU "
            "number is claimed. The GPU targets (ours fused ≥ 85% "
            "of the measured copy bandwidth on GPT-2-1.3B shapes; ours fused ≤ 0.75× the official FusedAdan; "
            "bf16-state fused no slower than torch fused AdamW fp32; peak memory beyond states ≤ 1% of the "
            "parameters) are unverified until `python tools/bench_step.py --device cuda` runs on a GPU.",
}


def _extract(text: str, kind: str) -> Optional[str]:
    begin, end = SECTION_BEGIN.format(kind=kind), SECTION_END.format(kind=kind)
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        return None
    return text[i + len(begin):j].strip("\n")


def write_doc(path: str, kind: str, body: str) -> None:
    """Rewrite ``path``: the header, then one section per device type ("cpu", "cuda") and per capped CPU
    run ("cpu-avx2", ...: ``--cpu-isa``); only ``kind``'s changes."""
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    capped = set(re.findall(SECTION_BEGIN.format(kind=r"(cpu-[a-z0-9_]+)"), old)) | (
        {kind} if kind.startswith("cpu-") else set())
    kinds = ["cpu", *sorted(capped), "cuda"]
    sections = {k: (_extract(old, k) or PLACEHOLDER.get(k, "")) for k in kinds}
    sections[kind] = body
    parts = [HEADER, "## Results"]
    for k in kinds:
        parts += [SECTION_BEGIN.format(kind=k), sections[k], SECTION_END.format(kind=k)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n\n".join(parts) + "\n")
    os.replace(tmp, path)


def write_chart(path: str, rows: Sequence[Row], info: RunInfo) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1.5, 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r.model == model]
        labels = [r.label for r in mrows]
        values = [r.ms if r.ms is not None else 0.0 for r in mrows]
        colors = ["tab:red" if r.variant.startswith("ours") else
                  "tab:gray" if r.variant.startswith("adamw") else "tab:blue" for r in mrows]
        y = range(len(mrows))
        ax.barh(y, values, color=colors)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * len(labels), fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("ms/step (log), lower is better", fontsize=8)
        top = max([v for v in values if v > 0], default=1.0)
        for yi, r in zip(y, mrows):
            if r.ms is None:
                ax.text(ax.get_xlim()[0] if r.reason else 0, yi, " n/a", va="center", fontsize=7)
            else:
                pct = 100 * r.gbps() / info.copy_gbps
                ax.text(r.ms, yi, f" {r.ms:.1f} ({pct:.0f}%)", va="center", fontsize=7)
        ax.set_xlim(right=top * 8)
    fig.suptitle(f"optimizer.step(), {info.device_type.upper()}: {info.device}, {info.date}\n"
                 f"(%: effective bandwidth as a share of the bandwidth floor, {info.copy_gbps:.1f} GB/s)",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
