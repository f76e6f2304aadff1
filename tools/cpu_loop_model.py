#!/usr/bin/env python
"""Predict the CPU kernels' cycles per element on CPUs we cannot run on, with llvm-mca.

    python tools/cpu_loop_model.py                          # Ice Lake-SP and Skylake-SP (AVX-512 builds), Zen 3 (AVX2)
    python tools/cpu_loop_model.py --mcpu icelake-server --isa avx512

The inner loops of the built extension (``adan_plugin/_C*.so``) are taken from its disassembly
(objdump) and handed to llvm-mca, which simulates them on a scheduling model of the named CPU: for each
build (``avx2``, ``avx512``, ``avx512_bf16``) and state kind (bf16, 8-bit) with fp32 parameters,
the update loop of a parameter's later steps with the default betas (lerp's first formula) and, for
8-bit states, the four block quantizers of blocks whose values are finite (three signed maps, one for
``exp_avg_sq``).  Printed: cycles per element of each loop and in all (8-bit: the update loop plus the
quantizers), and ns per element at ``--ghz``.

A prediction, not a measurement: a model of the core alone (every operand in L1, no memory
bandwidth, no frequency drop under AVX-512, no per-block or per-call work), so it bounds how fast the
arithmetic can stream, which matters only where that is slower than memory (8-bit states: the step is
then bound by its arithmetic, docs/benchmarks.md).  LLVM 14's scheduling models stop at Zen 3 and Ice
Lake: newer Intel names it accepts (sapphirerapids) reuse Ice Lake's and give the same numbers.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# llvm-mca CPU models and the builds they run (an AVX2-only Zen 3 cannot run the AVX-512 ones).
DEFAULT_MODELS = {"icelake-server": ("avx512", "avx512_bf16"), "skylake-avx512": ("avx512",),
                  "znver3": ("avx2",)}
BUILDS = ("avx2", "avx512", "avx512_bf16")
# fp32 states move 44 B per parameter, memory-bound everywhere; their loops are inlined into the
# dispatcher and are not modelled.
STATE_KINDS = ("bf16", "8bit")


@dataclass
class Loop:
    """One loop of the disassembly: its instructions (AT&T text) from the jump target to the backward jump."""
    start: int
    body: List[str]

    def count(self, *mnemonics: str) -> int:
        return sum(1 for ins in self.body if ins.split()[0] in mnemonics)

    def lanes(self, mnemonic: str) -> int:
        """Elements one ``mnemonic`` instruction of the loop processes (16 on zmm, 8 on ymm, 4 on xmm)."""
        for ins in self.body:
            if ins.split()[0] == mnemonic:
                return 16 if "%zmm" in ins else 8 if "%ymm" in ins else 4
        raise ValueError(f"no {mnemonic} in the loop at {self.start:#x}")


def parse_functions(objdump_text: str, wanted: Sequence[str]) -> Dict[str, List[Tuple[int, str]]]:
    """The instructions (address, text) of each function whose demangled name contains a ``wanted`` string."""
    out: Dict[str, List[Tuple[int, str]]] = {}
    current: Optional[List[Tuple[int, str]]] = None
    for line in objdump_text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            current = None
            if "@plt" not in name:
                for w in wanted:
                    if w in name and w not in out:
                        current = out[w] = []
                        break
            continue
        if current is not None:
            ins = re.match(r"^\s*([0-9a-f]+):\s*(.+)$", line)
            if ins:
                text = re.sub(r"\s+#.*$", "", ins.group(2)).strip()
                current.append((int(ins.group(1), 16), re.sub(r"\s+<.*>$", "", text)))
    return out


def find_loops(instructions: Sequence[Tuple[int, str]]) -> List[Loop]:
    """Every backward jump's body, innermost first (shortest)."""
    index = {addr: i for i, (addr, _) in enumerate(instructions)}
    loops = []
    for i, (_, text) in enumerate(instructions):
        jump = re.match(r"^(j\w+)\s+([0-9a-f]+)$", text)
        if jump:
            target = int(jump.group(2), 16)
            if target in index and index[target] <= i:
                loops.append(Loop(target, [t for _, t in instructions[index[target]:i + 1]]))
    return sorted(loops, key=lambda lp: len(lp.body))


def update_loop(loops: Iterable[Loop]) -> Loop:
    """The per-group update loop: the shortest loop with two square roots (two vectors a group) and no
    call; the bf16 store without the NaN test (the usual case) is the shorter variant."""
    for lp in loops:
        if lp.count("vsqrtps") == 2 and lp.count("call") == 0:
            return lp
    raise LookupError("no update loop (two vsqrtps, no call) found")


def quantizer_loops(loops: Iterable[Loop]) -> Tuple[Loop, Loop]:
    """(signed, exp_avg_sq) quantizers for finite blocks: loops with rsqrt estimates and no clamp to the
    top level (vminps: the clamped sequence for blocks that may hold NaN or Inf) and no square root."""
    signed = sq = None
    for lp in loops:
        if lp.count("vrsqrt14ps", "vrsqrtps") == 0 or lp.count("vminps", "vsqrtps", "call") or len(lp.body) > 60:
            continue
        if sq is None and lp.count("vpmaxub", "vpmaxsd"):
            sq = lp
        elif signed is None and lp.count("vpsubb", "vpsignd"):
            signed = lp
    if signed is None or sq is None:
        raise LookupError("the finite-block quantizer loops were not found")
    return signed, sq


def mca_cycles(loop: Loop, mcpu: str, iterations: int = 400) -> float:
    """llvm-mca's simulated cycles per iteration of ``loop`` on ``mcpu``."""
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(loop.body) + "\n")
        path = f.name
    try:
        r = subprocess.run(["llvm-mca", f"-mcpu={mcpu}", f"-iterations={iterations}", path],
                           capture_output=True, text=True)
    finally:
        os.unlink(path)
    m = re.search(r"Total Cycles:\s+(\d+)", r.stdout)
    if not m:
        raise RuntimeError(f"llvm-mca printed no cycle count: {r.stdout[:300]} {r.stderr[:300]}")
    return int(m.group(1)) / iterations


def known_models() -> List[str]:
    """The CPU models this llvm-mca has (``-mcpu=help``)."""
    r = subprocess.run(["llvm-mca", "-mcpu=help", "/dev/null"], capture_output=True, text=True)
    return re.findall(r"^\s+(\S+)\s+- Select the \S+ processor", r.stdout + r.stderr, re.M)


def symbol(isa: str, kind: str) -> str:
    """The demangled name (a unique part of it) of the function holding ``kind``'s loops in build ``isa``."""
    if kind == "8bit":
        return f"adan_plugin::{isa}::update_range_q8_t<float, false, true>("
    return (f"adan_plugin::{isa}::update_range_t<float, c10::BFloat16>(adan_plugin::CpuTensor const&, long, long, "
            "adan_plugin::AdanCoeffs const&)::{lambda(auto:1, auto:2)#1}::operator()"
            "<std::integral_constant<bool, false>, std::integral_constant<bool, true> >")


def model(functions: Dict[str, List[Tuple[int, str]]], isa: str, kind: str, mcpu: str) -> Dict[str, float]:
    """Cycles per element of ``kind``'s loops in build ``isa`` on ``mcpu`` ("update", and for 8-bit
    "quantize" for the four quantizers together), and "total"."""
    loops = find_loops(functions[symbol(isa, kind)])
    main = update_loop(loops)
    out = {"update": mca_cycles(main, mcpu) / (2 * main.lanes("vsqrtps"))}
    if kind == "8bit":
        signed, sq = quantizer_loops(loops)
        per_value = []
        for lp in (signed, sq):
            rsqrt = "vrsqrt14ps" if lp.count("vrsqrt14ps") else "vrsqrtps"
            per_value.append(mca_cycles(lp, mcpu) / (lp.count(rsqrt) * lp.lanes(rsqrt)))
        out["quantize"] = 3 * per_value[0] + per_value[1]
    out["total"] = sum(out.values())
    return out


# Times the op itself on this CPU (one thread, 16384 and 65536 elements: operands in L2), in a child
# process because the build is chosen once per process (ADAN_PLUGIN_CPU_ISA).  Prints
# "<build> bf16 <ns/el> 8bit <ns/el>".
_MEASURE = r"""
import sys, time, torch
import adan_plugin._C  # registers the ops
torch.set_num_threads(1)
op = torch.ops.adan_plugin.fused_adan_
kw = dict(lr=1e-3, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.02, no_prox=False, step=5.0,
          first=False, param_steps=[], kahan_comps=[])
def call(kind, N):
    p, g = torch.randn(N), torch.randn(N) * 1e-2
    if kind == "bf16":
        st = [[torch.rand(N).to(torch.bfloat16)] for _ in range(4)]
        return lambda: op([p], [g], *st, exp_avg_scales=[], exp_avg_sq_scales=[], exp_avg_diff_scales=[],
                          neg_pre_grad_scales=[], **kw)
    m, d, e = ([torch.randint(-127, 128, (N,), dtype=torch.int8)] for _ in range(3))
    n = [torch.randint(0, 256, (N,), dtype=torch.uint8)]
    sc = [[torch.full(((N + 255) // 256,), 1e-2)] for _ in range(4)]
    return lambda: op([p], [g], m, n, d, e, exp_avg_scales=sc[0], exp_avg_sq_scales=sc[1],
                      exp_avg_diff_scales=sc[2], neg_pre_grad_scales=sc[3], **kw)
def seconds(f, reps=200):
    for _ in range(20): f()
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps): f()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best
out = []
for kind in ("bf16", "8bit"):
    # The slope between two sizes: the op's per-call cost (dispatch, checks) drops out.
    big, small = seconds(call(kind, 65536)), seconds(call(kind, 16384))
    out += [kind, f"{(big - small) / (65536 - 16384) * 1e9:.3f}"]
print(torch.ops.adan_plugin._cpu_isa(), *out)
"""


def measure(isa: str) -> Dict[str, float]:
    """ns per element of the bf16- and 8-bit-state op on this CPU with build ``isa`` (one thread, in L2,
    per-call costs excluded)."""
    env = dict(os.environ, ADAN_PLUGIN_CPU_ISA=isa, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _MEASURE], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"timing the {isa} build failed: {r.stderr.strip().splitlines()[-1:]}")
    fields = r.stdout.split()
    if fields[0] != isa:
        raise RuntimeError(f"asked for the {isa} build, ran {fields[0]}")
    return {fields[i]: float(fields[i + 1]) for i in range(1, len(fields), 2)}


def extension_path() -> str:
    found = sorted(glob.glob(os.path.join(REPO_ROOT, "adan_plugin", "_C*.so")))
    if not found:
        raise SystemExit("no built extension (adan_plugin/_C*.so): run `make` or `pip install -e .` first")
    return found[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mcpu", default=None, help="comma list of llvm-mca CPU models "
                    f"(default: {', '.join(DEFAULT_MODELS)}; `llvm-mca -mcpu=help` lists them)")
    ap.add_argument("--isa", default=None, help="comma list of builds (default: those each model's CPU runs)")
    ap.add_argument("--ghz", type=float, default=3.0, help="clock for the ns/element column (default 3.0)")
    ap.add_argument("--so", default=None, help="extension to read (default: adan_plugin/_C*.so)")
    ap.add_argument("--measure", action="store_true",
                    help="also time each build this CPU runs (one thread, in L2), to compare the "
                         "model with a real core; the column names this CPU")
    args = ap.parse_args(argv)
    for tool in ("objdump", "llvm-mca"):
        if shutil.which(tool) is None:
            print(f"cpu_loop_model: `{tool}` is not installed (binutils, llvm)", file=sys.stderr)
            return 2
    mcpus = args.mcpu.split(",") if args.mcpu else list(DEFAULT_MODELS)
    known = known_models()
    unknown = [m for m in mcpus if m not in known]
    if unknown:
        print(f"cpu_loop_model: llvm-mca has no CPU model {', '.join(unknown)} (`llvm-mca -mcpu=help` lists "
              "them)", file=sys.stderr)
        return 2
    bad = [i for i in (args.isa.split(",") if args.isa else []) if i not in BUILDS]
    if bad:
        print(f"cpu_loop_model: --isa {','.join(bad)}: the builds are {', '.join(BUILDS)}", file=sys.stderr)
        return 2
    so = args.so or extension_path()
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", "-M", "att", so],
                          capture_output=True, text=True, check=True).stdout
    isas = {m: (args.isa.split(",") if args.isa else DEFAULT_MODELS.get(m, ("avx512", "avx2"))) for m in mcpus}
    functions = parse_functions(text, [symbol(i, k) for m in mcpus for i in isas[m] for k in STATE_KINDS])
    measured: Dict[str, object] = {}
    here = ""
    if args.measure:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import torch
        from bench.report import device_name
        here = f" | measured on {device_name(torch.device('cpu'))}, ns/el, one thread"
    print(f"llvm-mca predictions for {os.path.relpath(so, REPO_ROOT)} (fp32 parameters, later steps, default betas; "
          f"core only: L1-resident operands; ns/element on one core at {args.ghz:g} GHz)\n")
    print("| llvm-mca model | build | state | update loop (cycles/el) | quantizers (cycles/el) | total (cycles/el) "
          f"| ns/el, one core{here} |")
    print("|---|---|---|---|---|---|---|" + ("---|" if here else ""))
    for m in mcpus:
        for isa in isas[m]:
            if args.measure and isa not in measured:
                try:
                    measured[isa] = measure(isa)
                except RuntimeError as e:
                    measured[isa] = f"n/a ({e})"
            for kind in STATE_KINDS:
                name = symbol(isa, kind)
                if name in functions:
                    r = model(functions, isa, kind, m)
                    cells = [f"{r['update']:.2f}", f"{r['quantize']:.2f}" if "quantize" in r else "",
                             f"{r['total']:.2f}", f"{r['total'] / args.ghz:.2f}"]
                else:
                    cells = ["n/a (the loop is inlined into another function here)", "", "", ""]
                if args.measure:
                    got = measured[isa]
                    cells.append(f"{got[kind]:.3f}" if isinstance(got, dict) else str(got))
                print("| " + " | ".join([m, isa, kind] + cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
