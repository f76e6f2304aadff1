"""The run loop: per-model rows, settings, building each variant, timing rounds, CPU memory afterwards."""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from bench.measure import (BandwidthFloor, ComputeProbe, CpuPeakMemory, _sync,  # noqa: F401 (Settings' types)
                           cuda_peak_memory, op_bytes, time_fn)
from bench.shapes import Shape, numel
from bench.variants import Unavailable, Variant, state_bytes, step_bytes


# ----------------------------------------------------------------------------------------- running
@dataclass
class Row:
    model: str
    variant: str
    label: str
    reason: Optional[str] = None        # set: n/a
    times: List[float] = field(default_factory=list)
    bytes: int = 0
    op_bytes: Optional[int] = None      # what its ops read and write (not for compiled steps)
    params: int = 0
    state_bytes: int = 0
    peak_extra: Optional[int] = None
    peak_reason: Optional[str] = None
    compile_s: Optional[float] = None
    largest_tensor_bytes: int = 0       # of one fp32 parameter tensor of the model
    # baseline variant -> this variant's step time over the baseline's, one ratio per pair of steps
    # timed back to back (paired_ratios)
    paired: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def ms(self) -> Optional[float]:
        return statistics.median(self.times) * 1e3 if self.times else None

    def gbps(self) -> Optional[float]:
        return self.bytes / (self.ms / 1e3) / 1e9 if self.times else None


@dataclass
class Settings:
    device: torch.device
    warmup: int
    repeats: int
    min_repeats: int
    max_seconds: float
    memory: bool = True
    rounds: int = 1
    floor: Optional["BandwidthFloor"] = None
    probe: Optional["ComputeProbe"] = None
    compile_models: Sequence[str] = ()
    compile_budget: float = 600.0

    def measure_host(self) -> None:
        """One more measurement of the bandwidth floor and the compute probe (those this run has)."""
        for m in (self.floor, self.probe):
            if m is not None:
                m.measure()


class Bench:
    """One model's parameters and gradients; builds each variant on fresh copies of the parameters."""

    def __init__(self, shapes: Sequence[Shape], device: torch.device, seed: int = 0):
        # On a GPU the values are drawn there: 2.6 billion CPU normals for GPT-2-1.3B would take longer
        # than timing its steps.
        gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
        self.master = [torch.randn(s, generator=gen, device=gen.device).to(device) for s in shapes]
        # Gradients are shared by every variant: the steps read them and none changes their values.
        self.grads = [torch.randn(s, generator=gen, device=gen.device).to(device) for s in shapes]
        self.numel = numel(shapes)

    def build(self, variant: Variant):
        params = [m.clone().requires_grad_(True) for m in self.master]
        for p, g in zip(params, self.grads):
            p.grad = g
        opt = variant.make(params)
        if variant.compiled:
            compiled = torch.compile(opt.step)

            def step():
                compiled()
        else:
            step = opt.step
        return params, opt, step


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split()) if not isinstance(err, Unavailable) \
        else " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fits_in_memory(n: int, device: torch.device) -> Optional[str]:
    """None if a model of ``n`` fp32 parameters fits the biggest variant here, else the reason.
    Biggest: mmpretrain's Adan, params + grads + master copy + 4 states + a gradient-sized copy and a
    few parameter-sized temporaries: about 12 parameter-sized fp32 tensors."""
    need = 12 * 4 * n
    if device.type == "cuda":
        # Blocks the caching allocator keeps from the previous model are free for this one.
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        avail = free
    else:
        avail = _meminfo("MemAvailable")
        if avail is None:
            return None
    if need > 0.8 * avail:
        return (f"needs ~{need / 2**30:.0f} GiB ({n / 1e6:.0f}M params x 12 fp32 tensors), "
                f"{avail / 2**30:.0f} GiB available")
    return None


def _meminfo(key: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_warmup(step: Callable[[], object], s: Settings, max_compiles: int = 5) -> float:
    """Call a ``torch.compile``d step until a call compiles nothing new; returns the seconds spent.

    Our step count is a Python int in the parameter group, so dynamo compiles step 1 (state seeding),
    recompiles for step 2 and only then treats the count as dynamic.  A step that keeps recompiling
    would time the compiler, so it is reported as unavailable instead."""
    t0 = time.perf_counter()
    for _ in range(max_compiles):
        before = _graphs_compiled()
        step()
        _sync(s.device)
        if _graphs_compiled() == before:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > s.compile_budget:
            raise Unavailable(f"torch.compile still compiling after {time.perf_counter() - t0:.0f} s "
                              f"(--compile-budget {s.compile_budget:g} s)")
    raise Unavailable(f"torch.compile(opt.step) compiled a new graph on each of {max_compiles} steps")


# Ratio targets measured step against step on the CPU: (variant, baseline) pairs.
PAIRED = (("ours-fused", "adamw-fused"), ("ours-fused-bf16", "adamw-fused"), ("ours-fused-8bit", "adamw-fused"))


def paired_ratios(bench: "Bench", variants: Sequence[Variant], rows: Sequence[Row], s: Settings,
                  pairs=PAIRED, log=print) -> None:
    """For each (variant, baseline) pair that both ran, alternate one step of each (the order swapped
    every pair) and keep each pair's time ratio in ``row.paired[baseline]``.  On a shared machine the
    rounds' medians of two variants come from different seconds, and load that comes and goes (other
    processes, other guests of the host) moves their ratio by tens of percent between runs; two steps
    back to back see the same load."""
    by_name = {v.name: (v, r) for v, r in zip(variants, rows)}
    for a, b in pairs:
        if a not in by_name or b not in by_name:
            continue
        (va, ra), (vb, rb) = by_name[a], by_name[b]
        if ra.reason is not None or rb.reason is not None or not ra.times or not rb.times:
            continue
        step_a = step_b = None
        try:
            step_a, step_b = bench.build(va)[2], bench.build(vb)[2]
            for _ in range(max(2, s.warmup)):
                step_a()
                step_b()
            ratios: List[float] = []
            started = time.perf_counter()
            for i in range(s.repeats):
                first, second = (step_a, step_b) if i % 2 == 0 else (step_b, step_a)
                t0 = time.perf_counter()
                first()
                t1 = time.perf_counter()
                second()
                t2 = time.perf_counter()
                ta, tb = (t1 - t0, t2 - t1) if i % 2 == 0 else (t2 - t1, t1 - t0)
                ratios.append(ta / tb)
                if i + 1 >= s.min_repeats and time.perf_counter() - started > s.max_seconds:
                    break
            ra.paired[b] = ratios
            log(f"  {ra.model:>22} {a:<22} / {b}: {statistics.median(ratios):.2f}x step against step "
                f"({len(ratios)} pairs)")
        except Exception as err:  # noqa: BLE001  -- the rounds' rows stand without it
            log(f"  {ra.model:>22} {a:<22} / {b}: paired timing n/a: {_short(err)}")
        finally:
            step_a = step_b = None  # noqa: F841
            gc.collect()


def run_model(model: str, shapes: Sequence[Shape], variants: Sequence[Variant], s: Settings,
              log=print, kept: Optional[dict] = None) -> List[Row]:
    """Time every variant on ``shapes``.  CUDA: peak memory measured right after; CPU: later, by
    :func:`measure_cpu_memory` (compiled variants are left in ``kept`` for it)."""
    largest = 4 * max((math.prod(sh) for sh in shapes), default=0)
    rows = [Row(model, v.name, v.label, params=numel(shapes), largest_tensor_bytes=largest) for v in variants]
    if kept is None:
        kept = {}
    reason = fits_in_memory(numel(shapes), s.device)
    if reason:
        for r in rows:
            r.reason = reason
        log(f"  {model}: skipped: {reason}")
        return rows
    bench = Bench(shapes, s.device)
    # Rounds: every variant is timed for a share of its steps in each round, so a burst of load from
    # other processes spreads over all variants instead of landing on one.
    per_round = max(1, math.ceil(s.repeats / s.rounds))
    min_round = max(1, math.ceil(s.min_repeats / s.rounds))
    compiled_live: Dict[str, tuple] = {}   # compiled once, reused by every round
    for rnd in range(s.rounds):
        s.measure_host()
        for row, variant in zip(rows, variants):
            if row.reason is not None:
                continue
            params = opt = step = None
            try:
                if variant.compiled and model not in s.compile_models:
                    raise Unavailable(f"torch.compile skipped for {model} in this run (--compile-models); "
                                      "compiling takes minutes")
                if variant.name in compiled_live:
                    params, opt, step = compiled_live[variant.name]
                    warmup = min(1, s.warmup)
                else:
                    params, opt, step = bench.build(variant)
                    # Later rounds: two steps allocate the states and seed neg_pre_grad.
                    warmup = s.warmup if rnd == 0 else min(2, s.warmup)
                    if variant.compiled:
                        row.compile_s = compile_warmup(step, s)
                        compiled_live[variant.name] = (params, opt, step)
                row.times += time_fn(step, s.device, warmup=warmup, repeats=per_round,
                                     min_repeats=min_round, max_seconds=s.max_seconds / s.rounds)
                if rnd == 0:
                    row.bytes = step_bytes(opt)
                    row.state_bytes = state_bytes(opt)
                    # Inductor's kernels and pybind extension calls are not dispatched ops: nothing to count.
                    if not variant.compiled and not variant.opaque:
                        try:
                            row.op_bytes = op_bytes(step)
                        except Exception as err:  # noqa: BLE001  -- the timings stand without it
                            log(f"  {model:>22} {variant.name:<22} ops' bytes n/a: {_short(err)}")
                if rnd == s.rounds - 1:
                    if s.memory and s.device.type == "cuda":
                        row.peak_extra = cuda_peak_memory(step, s.device)
                    log(f"  {model:>22} {variant.name:<22} {row.ms:9.2f} ms  ({len(row.times)} steps)")
            except Exception as err:  # noqa: BLE001  -- any failure becomes an n/a row, the run goes on
                row.reason, row.times = _short(err), []
                compiled_live.pop(variant.name, None)
                log(f"  {model:>22} {variant.name:<22} n/a: {row.reason}")
            finally:
                params = opt = step = None  # noqa: F841
                gc.collect()
                if s.device.type == "cuda":
                    torch.cuda.empty_cache()
    if s.device.type == "cpu":
        paired_ratios(bench, variants, rows, s, log=log)
    if s.memory and s.device.type == "cpu":
        # Measured with the others after all timings; kept so that it is not compiled twice.
        kept.update(compiled_live)
    compiled_live.clear()
    del bench
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_cpu_memory(model_rows: Dict[str, List[Row]], shapes: Dict[str, Sequence[Shape]],
                       variants: Sequence[Variant], kept: Dict[str, dict], log=print) -> None:
    """Peak memory of one step beyond params, grads and (already allocated) states, per timed row;
    run after every timing because :class:`CpuPeakMemory` changes how glibc allocates."""
    by_name = {v.name: v for v in variants}
    probe = CpuPeakMemory()
    for model, rows in model_rows.items():
        timed = [r for r in rows if r.reason is None]
        if not timed:
            continue
        if probe.reason:
            for r in timed:
                r.peak_reason = probe.reason
            continue
        mine = kept.pop(model, {})
        bench = Bench(shapes[model], torch.device("cpu"))
        for row in timed:
            try:
                if row.variant in mine:
                    params, opt, step = mine.pop(row.variant)
                else:
                    params, opt, step = bench.build(by_name[row.variant])
                    step()  # states allocated and seeded: the next step is a steady one
                row.peak_extra = probe.measure(step)
            except Exception as err:  # noqa: BLE001
                row.peak_reason = _short(err)
            finally:
                params = opt = step = None  # noqa: F841
                gc.collect()
        log(f"  memory measured: {model}")
        del bench
        gc.collect()
