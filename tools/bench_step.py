#!/usr/bin/env python
"""Time ``optimizer.step()`` on the parameter shapes of real models.

    python tools/bench_step.py                      # CPU: resnet50, vit_base_patch16_224, convnext_tiny
    python tools/bench_step.py --device cuda        # adds GPT-2 (24 layers, width 1536 and 2048)
    python tools/bench_step.py --quick --no-write   # ResNet-50 shapes only, few repeats, print only

For each model and optimizer variant: median ms per step (warm-up first; CUDA events on a GPU,
``time.perf_counter`` on the CPU), effective GB/s at the bytes the step must move, that bandwidth as a
percentage of a copy bandwidth measured on the same device in the same run, and the peak memory a step
allocates beyond parameters, gradients and optimizer states.  Results go to ``docs/benchmarks.md`` (one
section per device type; the other device's section is kept) and a bar chart beside it.

A variant that cannot run here (extension not built, option missing, compile failure, not enough memory)
becomes an ``n/a (reason)`` row; the run goes on.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DOC = os.path.join(REPO_ROOT, "docs", "benchmarks.md")

Shape = Tuple[int, ...]

# Hyper-parameters of every Adan variant (no clipping: timm's Adan has none, and clipping would time a
# norm reduction rather than the update) and of AdamW.
ADAN_HP = dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02)
ADAMW_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.02)


# ------------------------------------------------------------------------------------------- shapes
def timm_shapes(name: str) -> List[Shape]:
    """Parameter shapes of a timm model, built on the meta device (no weights, no download)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return [tuple(p.shape) for p in model.parameters()]


def gpt2_shapes(layers: int, width: int, vocab: int, context: int) -> List[Shape]:
    """GPT-2 parameter shapes: token and position embeddings (the output head is tied to the token
    embedding), per layer LayerNorm, fused qkv, attention projection, LayerNorm, fc (4x width), fc2,
    each Linear with a bias, and the final LayerNorm."""
    shapes: List[Shape] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,),                        # ln_1
                   (3 * width, width), (3 * width,),          # qkv
                   (width, width), (width,),                  # attention output projection
                   (width,), (width,),                        # ln_2
                   (4 * width, width), (4 * width,),          # fc
                   (width, 4 * width), (width,)]              # fc2
    shapes += [(width,), (width,)]                            # final LayerNorm
    return shapes


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    shapes: Callable[[], List[Shape]]
    cpu_default: bool = True


# The GPT-2 rows follow the table of the official Adan repository's fused kernel README: 24 layers,
# embedding width 1536 / 2048, vocabulary 49280, sequence length 2048 (used here as the position table).
MODELS: Dict[str, ModelSpec] = {
    "resnet50": ModelSpec("resnet50", "timm resnet50", lambda: timm_shapes("resnet50")),
    "vit_base_patch16_224": ModelSpec("vit_base_patch16_224", "timm vit_base_patch16_224",
                                      lambda: timm_shapes("vit_base_patch16_224")),
    "convnext_tiny": ModelSpec("convnext_tiny", "timm convnext_tiny", lambda: timm_shapes("convnext_tiny")),
    "gpt2-1536": ModelSpec("gpt2-1536", "GPT-2, 24 layers, width 1536, vocab 49280",
                           lambda: gpt2_shapes(24, 1536, 49280, 2048), cpu_default=False),
    "gpt2-2048": ModelSpec("gpt2-2048", "GPT-2, 24 layers, width 2048, vocab 49280",
                           lambda: gpt2_shapes(24, 2048, 49280, 2048), cpu_default=False),
    # For smoke tests of this tool only.
    "tiny": ModelSpec("tiny", "GPT-2 layout, 2 layers, width 32, vocab 128 (smoke test)",
                      lambda: gpt2_shapes(2, 32, 128, 16), cpu_default=False),
}


def numel(shapes: Sequence[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


# ----------------------------------------------------------------------------------------- variants
class Unavailable(Exception):
    """A variant cannot run here; the message is the reason shown in the table."""


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    make: Callable[[List[torch.Tensor]], torch.optim.Optimizer]
    compiled: bool = False


def _ours(**kw):
    def make(params):
        from adan_plugin import Adan
        from adan_plugin import _ext

        if kw.get("fused"):
            if not _ext.extension_loaded():
                raise Unavailable(f"extension not built: {_ext.load_error()}")
            if not _ext.fused_supported(params[0].device):
                raise Unavailable(f"fused kernels not built for {params[0].device.type}")
        try:
            return Adan(params, **ADAN_HP, **kw)
        except TypeError as err:  # e.g. state_dtype not (yet) an option
            raise Unavailable(f"Adan does not accept {sorted(kw)}: {err}") from err
    return make


def _timm(foreach: bool):
    def make(params):
        try:
            from timm.optim.adan import Adan as TimmAdan
        except ImportError as err:
            raise Unavailable(f"timm not installed: {err}") from err
        return TimmAdan(params, **ADAN_HP, foreach=foreach)
    return make


def _mmpretrain(params):
    try:
        from mmpretrain.engine.optimizers.adan_t import Adan as MMAdan
    except ImportError as err:
        raise Unavailable(f"mmpretrain not installed: {err}") from err
    return MMAdan(params, **ADAN_HP)  # its default foreach=True


def _adamw(**kw):
    def make(params):
        try:
            return torch.optim.AdamW(params, **ADAMW_HP, **kw)
        except (RuntimeError, ValueError) as err:
            raise Unavailable(str(err)) from err
    return make


VARIANTS: Dict[str, Variant] = {v.name: v for v in [
    Variant("ours-fused", "ours fused (fp32 state)", _ours(fused=True)),
    Variant("ours-fused-bf16", "ours fused (bf16 state)", _ours(fused=True, state_dtype=torch.bfloat16)),
    Variant("ours-foreach", "ours foreach", _ours(fused=False, foreach=True)),
    Variant("ours-single", "ours single-tensor", _ours(fused=False, foreach=False)),
    Variant("ours-foreach-compiled", "ours foreach, torch.compile", _ours(fused=False, foreach=True),
            compiled=True),
    Variant("timm-foreach", "timm Adan foreach", _timm(True)),
    Variant("timm-single", "timm Adan single-tensor", _timm(False)),
    Variant("mmpretrain", "mmpretrain Adan (foreach)", _mmpretrain),
    Variant("adamw-fused", "torch AdamW fused", _adamw(fused=True)),
    Variant("adamw-foreach", "torch AdamW foreach", _adamw(foreach=True)),
]}


# ------------------------------------------------------------------------------- byte accounting
def step_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes one step must move at least: every parameter with a gradient is read and written, its
    gradient read, and every tensor in its optimizer state read and written (Adan: exp_avg, exp_avg_sq,
    exp_avg_diff, neg_pre_grad or mmpretrain's pre_grad; AdamW: exp_avg, exp_avg_sq and the step
    tensor).  Counted from the tensors the optimizer holds after a step, so a bf16 state counts 2 bytes
    per element, an fp32 step tensor 4 bytes per parameter tensor."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            total += 2 * _nbytes(p) + _nbytes(p.grad)
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value):
                    total += 2 * _nbytes(value)
    return total


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_nbytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
            min_repeats: int, max_seconds: float) -> List[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls; at most ``repeats`` calls, stopping early once
    ``min_repeats`` are done and ``max_seconds`` have passed.  Warm-up stops early too, after two
    calls (states allocated, steady state reached), once it has taken ``max_seconds``."""
    started = time.perf_counter()
    for i in range(warmup):
        fn()
        if i + 1 >= 2 and time.perf_counter() - started > max_seconds:
            break
    _sync(device)
    times: List[float] = []
    started = time.perf_counter()
    if device.type == "cuda":
        events = []
        for i in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if i + 1 >= min_repeats and time.perf_counter() - started > max_seconds:
                break
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if i + 1 >= min_repeats and time.perf_counter() - started > max_seconds:
                break
    return times


class BandwidthFloor:
    """Streaming bandwidth of trivial kernels, timed like the steps, on ``mib`` MiB fp32 tensors:
    ``dst.copy_(src)`` (2 x size moved: read src, write dst) and ``a.add_(b)`` (3 x size: read a and b,
    write a; an in-place pattern like the optimizers' own, without the read-for-ownership of a write-only
    destination that makes a CPU copy look slow).  Measured several times during a run; the floor is
    the fastest of all measurements, so noise from other processes cannot flatter the percentages."""

    def __init__(self, device: torch.device, mib: int, repeats: int):
        self.device, self.mib, self.repeats = device, mib, repeats
        self.copy: List[float] = []
        self.add: List[float] = []

    def measure(self) -> None:
        n = self.mib * 2**20 // 4
        a = torch.empty(n, device=self.device).uniform_()
        b = torch.empty_like(a).uniform_()
        kw = dict(warmup=2, repeats=self.repeats, min_repeats=self.repeats, max_seconds=float("inf"))
        self.copy.append(2 * n * 4 / statistics.median(time_fn(lambda: b.copy_(a), self.device, **kw)) / 1e9)
        self.add.append(3 * n * 4 / statistics.median(time_fn(lambda: a.add_(b), self.device, **kw)) / 1e9)
        del a, b

    @property
    def gbps(self) -> float:
        return max(self.copy + self.add)

    def describe(self) -> str:
        def span(xs):
            return f"{min(xs):.1f}–{max(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"
        return (f"`dst.copy_(src)` {span(self.copy)} GB/s and in-place `a.add_(b)` {span(self.add)} GB/s "
                f"over {len(self.copy)} measurements on {self.mib} MiB fp32 tensors; floor = the fastest: "
                f"**{self.gbps:.1f} GB/s**")


# ------------------------------------------------------------------------------------------ memory
class CpuPeakMemory:
    """Peak resident memory of a call above the resident memory before it (Linux).

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` <- 5) before the call and reads
    ``VmHWM`` after it.  For that to see every allocation, glibc is first told to serve allocations of
    64 KiB and more with fresh ``mmap``s and to return freed memory at once (``mallopt``), and free heap
    pages are released (``malloc_trim``): a temporary then becomes resident when written and leaves on
    free, instead of reusing already-resident heap pages unseen.  These settings slow allocation-heavy
    code, so they are applied only after all timings are done.  Allocations under 64 KiB may reuse heap
    pages and escape the measure (a few hundred KiB at most)."""

    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

    def __init__(self):
        self.reason: Optional[str] = None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._read("VmHWM")
        except (OSError, ValueError, AttributeError) as err:
            self.reason = f"needs Linux /proc/self/clear_refs and glibc: {err}"
            return
        ok = (self._libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
              and self._libc.mallopt(self.M_TRIM_THRESHOLD, 128 * 1024)
              and self._libc.mallopt(self.M_TOP_PAD, 0))
        if not ok:
            self.reason = "glibc mallopt refused the settings"

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise ValueError(f"{key} missing from /proc/self/status")

    def measure(self, fn: Callable[[], object]) -> int:
        gc.collect()
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = self._read("VmRSS")
        fn()
        return max(0, self._read("VmHWM") - base)


def cuda_peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base)


# ----------------------------------------------------------------------------------------- running
@dataclass
class Row:
    model: str
    variant: str
    label: str
    reason: Optional[str] = None        # set: n/a
    times: List[float] = field(default_factory=list)
    bytes: int = 0
    params: int = 0
    state_bytes: int = 0
    peak_extra: Optional[int] = None
    peak_reason: Optional[str] = None
    compile_s: Optional[float] = None
    largest_tensor_bytes: int = 0       # of one fp32 parameter tensor of the model

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
    compile_models: Sequence[str] = ()
    compile_budget: float = 600.0


class Bench:
    """One model's parameters and gradients; builds each variant on fresh copies of the parameters."""

    def __init__(self, shapes: Sequence[Shape], device: torch.device, seed: int = 0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.master = [torch.randn(s, generator=gen).to(device) for s in shapes]
        # Gradients are shared by every variant: the steps read them and none changes their values.
        self.grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
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
        if s.floor is not None:
            s.floor.measure()
        for row, variant in zip(rows, variants):
            if row.reason is not None:
                continue
            params = opt = step = None
            try:
                if variant.compiled and model not in s.compile_models:
                    raise Unavailable(f"torch.compile skipped for {model} in this run (--compile-models); "
                                      "compiling takes minutes on a few CPU cores")
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
    if s.memory and s.device.type == "cpu":
        # Measured with the others after all timings; kept so that it is not compiled twice.
        kept.update(compiled_live)
    compiled_live.clear()
    del bench
    gc.collect()
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


# ----------------------------------------------------------------------------------------- reports
@dataclass
class RunInfo:
    device: str
    device_type: str
    date: str
    versions: Dict[str, str]
    threads: int
    load_before: Tuple[float, float, float]
    load_after: Tuple[float, float, float]
    copy_gbps: float
    floor_detail: str
    command: str
    settings: str


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = _meminfo("MemTotal")
    return f"{model}, {os.cpu_count()} logical CPUs" + (f", {mem / 2**30:.0f} GiB RAM" if mem else "")


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("timm", "mmpretrain"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "adan_plugin", "csrc", "setup.py"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        out["adan_plugin"] = (commit or "unknown") + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["adan_plugin"] = "unknown"
    try:
        from adan_plugin import _ext
        if _ext.extension_loaded():
            import adan_plugin._C as ext
            built = datetime.datetime.fromtimestamp(os.path.getmtime(ext.__file__), datetime.timezone.utc)
            out["adan_plugin._C"] = f"built {built.strftime('%Y-%m-%d %H:%M UTC')}"
        else:
            out["adan_plugin._C"] = "not built"
    except ImportError:
        out["adan_plugin._C"] = "adan_plugin not importable"
    return out


def _row_lookup(rows: Sequence[Row]) -> Dict[Tuple[str, str], Row]:
    return {(r.model, r.variant): r for r in rows}


@dataclass
class Target:
    text: str
    verdict: str   # "met", "not met" or "not evaluated"
    detail: str


def evaluate_targets(rows: Sequence[Row], info: RunInfo) -> List[Target]:
    """The issue's targets, from this run's numbers only."""
    look = _row_lookup(rows)

    def get(model, variant) -> Optional[Row]:
        r = look.get((model, variant))
        return r if r is not None and r.reason is None and r.times else None

    def missing(*keys) -> str:
        out = []
        for model, variant in keys:
            r = look.get((model, variant))
            out.append(f"{model}/{variant}: " + ("not run" if r is None else f"n/a ({r.reason})"))
        return "; ".join(out)

    targets: List[Target] = []
    for model in dict.fromkeys(r.model for r in rows):
        for variant in ("ours-fused", "ours-fused-bf16"):
            r = get(model, variant)
            if r is None or r.largest_tensor_bytes == 0:
                continue
            text = f"{model}, {variant}: no parameter-sized temporary (peak beyond states < largest parameter tensor)"
            if r.peak_extra is None:
                targets.append(Target(text, "not evaluated", f"peak memory n/a ({r.peak_reason or 'not measured'})"))
            else:
                targets.append(Target(text, "met" if r.peak_extra < r.largest_tensor_bytes else "not met",
                                      f"{r.peak_extra / 2**20:.2f} MiB vs {r.largest_tensor_bytes / 2**20:.2f} MiB"))
    if info.device_type == "cpu":
        fused, adamw, timm_fe = (get("resnet50", v) for v in ("ours-fused", "adamw-fused", "timm-foreach"))
        text = "CPU, ResNet-50 shapes, fp32: ours fused ≤ 1.65× torch AdamW(fused=True) ms/step"
        if fused and adamw:
            ratio = fused.ms / adamw.ms
            targets.append(Target(text, "met" if ratio <= 1.65 else "not met",
                                  f"{fused.ms:.2f} / {adamw.ms:.2f} ms = {ratio:.2f}×"))
        else:
            targets.append(Target(text, "not evaluated",
                                  missing(("resnet50", "ours-fused"), ("resnet50", "adamw-fused"))))
        text = "CPU, ResNet-50 shapes, fp32: ours fused ≥ 6× faster than timm Adan foreach"
        if fused and timm_fe:
            ratio = timm_fe.ms / fused.ms
            targets.append(Target(text, "met" if ratio >= 6 else "not met",
                                  f"{timm_fe.ms:.2f} / {fused.ms:.2f} ms = {ratio:.2f}×"))
        else:
            targets.append(Target(text, "not evaluated",
                                  missing(("resnet50", "ours-fused"), ("resnet50", "timm-foreach"))))
    else:
        fused = get("gpt2-2048", "ours-fused")
        text = "GPU, GPT-2 width 2048 (1.3B) shapes: ours fused ≥ 85% of the measured copy bandwidth (floor)"
        if fused:
            pct = 100 * fused.gbps() / info.copy_gbps
            targets.append(Target(text, "met" if pct >= 85 else "not met",
                                  f"{fused.gbps():.0f} / {info.copy_gbps:.0f} GB/s = {pct:.1f}%"))
        else:
            targets.append(Target(text, "not evaluated", missing(("gpt2-2048", "ours-fused"))))
        for model in ("gpt2-1536", "gpt2-2048"):
            bf16, adamw = get(model, "ours-fused-bf16"), get(model, "adamw-fused")
            text = f"GPU, {model} shapes: ours fused bf16 state no slower than torch AdamW(fused=True) fp32"
            if bf16 and adamw:
                targets.append(Target(text, "met" if bf16.ms <= adamw.ms else "not met",
                                      f"{bf16.ms:.2f} vs {adamw.ms:.2f} ms"))
            else:
                targets.append(Target(text, "not evaluated",
                                      missing((model, "ours-fused-bf16"), (model, "adamw-fused"))))
    return targets


def _mib(n: Optional[int]) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def results_table(rows: Sequence[Row], info: RunInfo) -> str:
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        mrows = [r for r in rows if r.model == model]
        n = mrows[0].params
        lines += ["", f"#### {model} ({MODELS[model].description if model in MODELS else model}: "
                  f"{n / 1e6:.2f}M parameters, {n * 4 / 2**20:.0f} MiB fp32)", "",
                  "| variant | ms/step (median) | min–max ms | steps | B/param | GB/s | % of floor "
                  "| state MiB | peak MiB beyond states |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mrows:
            if r.reason is not None:
                lines.append(f"| {r.label} | n/a ({r.reason}) | | | | | | | |")
                continue
            gbps = r.gbps()
            peak = _mib(r.peak_extra) if r.peak_reason is None else f"n/a ({r.peak_reason})"
            label = r.label + (f" (compile {r.compile_s:.0f} s)" if r.compile_s is not None else "")
            lines.append(
                f"| {label} | {r.ms:.2f} | {min(r.times) * 1e3:.2f}–{max(r.times) * 1e3:.2f} | {len(r.times)} "
                f"| {r.bytes / r.params:.2f} | {gbps:.1f} | {100 * gbps / info.copy_gbps:.0f}% "
                f"| {_mib(r.state_bytes)} | {peak} |")
    return "\n".join(lines)


def section(rows: Sequence[Row], info: RunInfo, chart: Optional[str]) -> str:
    targets = evaluate_targets(rows, info)
    v = info.versions
    out = [
        f"### Run: {info.device_type.upper()} — {info.device}", "",
        f"- date: {info.date}",
        f"- versions: torch {v['torch']}, timm {v['timm']}, mmpretrain {v['mmpretrain']}, "
        f"python {v['python']}, adan_plugin commit {v['adan_plugin']} at the start of the run "
        f"(extension adan_plugin._C: {v['adan_plugin._C']})",
        f"- command: `{info.command}` ({info.settings})",
        f"- torch threads: {info.threads}; load average (1/5/15 min) before: "
        + "/".join(f"{x:.2f}" for x in info.load_before) + ", after: "
        + "/".join(f"{x:.2f}" for x in info.load_after),
        f"- bandwidth floor (bytes read + written / median time): {info.floor_detail}",
        "", "Targets (ratios from this run only):", "",
        "| target | result | numbers |", "|---|---|---|",
    ]
    out += [f"| {t.text} | **{t.verdict}** | {t.detail} |" for t in targets]
    out.append(results_table(rows, info))
    if chart:
        out += ["", f"![step time per variant, {info.device_type}]({os.path.basename(chart)})"]
    return "\n".join(out)


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
- **GB/s**: B/param × parameters / median step time ("effective bandwidth").
- **% of floor**: GB/s divided by the streaming bandwidth floor measured on the same device in the same run,
  timed the same way: the fastest of `dst.copy_(src)` (2 × size moved) and in-place `a.add_(b)` (3 × size)
  on large fp32 tensors, measured at the start, once per model and round, and at the end (the fastest
  measurement counts, so load from other processes lowers rather than flatters the percentages).  On a CPU
  the in-place add is the faster one: a copy's write-only destination costs an extra read for ownership
  that the optimizers' in-place updates do not pay.  A step that moved its bytes as fast as that would
  reach 100%; an unfused step whose per-tensor passes stay in cache can exceed it on small tensors.
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
| ours foreach / single-tensor | `Adan(foreach=True / False, fused=False)`: `torch._foreach_*` ops / a loop of per-tensor ops |
| ours foreach, torch.compile | `torch.compile(opt.step)` on `Adan(foreach=True, fused=False)`; compile time shown, not timed |
| timm Adan foreach / single-tensor | `timm.optim.Adan(foreach=True / False)` |
| mmpretrain Adan | `mmpretrain.engine.optimizers.Adan` with its default `foreach=True` |
| torch AdamW fused / foreach | `torch.optim.AdamW(fused=True)` / `(foreach=True)` |

Models: parameter shapes of timm `resnet50`, `vit_base_patch16_224`, `convnext_tiny` (built with
`pretrained=False` on the meta device), and GPT-2 as in the table of the official Adan fused-kernel README:
24 layers, width 1536 or 2048, vocabulary 49280, sequence length 2048 (token embedding tied to the output
head, position embedding of 2048 rows; per layer two LayerNorms, qkv, attention projection, fc (4× width),
fc2, each Linear with a bias; a final LayerNorm).  GPT-2 runs on a GPU by default: with ~0.76 B / 1.3 B
parameters its Adan state alone is 12 / 21 GB in fp32, more than a shared 24 GiB CPU machine can hold for
every variant (`--models gpt2-1536` on a CPU runs it if memory allows, otherwise its rows say why not).
On the CPU the `torch.compile` variant runs on ResNet-50 shapes only by default (`--compile-models`):
compiling takes minutes on two cores.  Our step count is a Python int, so dynamo compiles three graphs
(first step, second step, then a dynamic step count) before the step settles; the tool warms up until a
step compiles nothing new.

Reading CPU numbers from a shared machine: torch runs each op with its intra-op thread pool, and an op
split over two threads waits for both.  When other processes keep the cores busy, every parallel region
can wait a scheduler time slice for its second thread (seen here: `sqrt` of a 4096-element tensor took
about 10 ms with two threads under load, 2 µs with one), so implementations that issue many ops per step
(single-tensor and foreach paths: over a thousand on these models) slow down far more than a one-pass
kernel (ours fused: one parallel region per step).  Each run states its load average; compare ratios within a run only.
"""

SECTION_BEGIN = "<!-- bench_step:{kind}:begin -->"
SECTION_END = "<!-- bench_step:{kind}:end -->"
PLACEHOLDER = {
    "cpu": "### Run: CPU\n\nNo CPU run recorded yet.",
    "cuda": "### Run: CUDA\n\nNo GPU run recorded (the machine these results come from has no GPU): no GPU "
            "number is claimed. The GPU targets (ours fused ≥ 85% "
            "of the measured copy bandwidth on GPT-2-1.3B shapes; bf16-state fused no slower than torch fused "
            "AdamW fp32) are unverified until `python tools/bench_step.py --device cuda` runs on a GPU.",
}


def _extract(text: str, kind: str) -> Optional[str]:
    begin, end = SECTION_BEGIN.format(kind=kind), SECTION_END.format(kind=kind)
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        return None
    return text[i + len(begin):j].strip("\n")


def write_doc(path: str, kind: str, body: str) -> None:
    """Rewrite ``path``: the header, then one section per device type; only ``kind``'s changes."""
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    sections = {k: (_extract(old, k) or PLACEHOLDER[k]) for k in ("cpu", "cuda")}
    sections[kind] = body
    parts = [HEADER, "## Results"]
    for k in ("cpu", "cuda"):
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


# -------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    ap.add_argument("--models", default=None,
                    help=f"comma list from {', '.join(MODELS)} (default: CPU: the three timm models; "
                         "CUDA: those and both GPT-2)")
    ap.add_argument("--variants", default=None, help=f"comma list from {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--repeats", type=int, default=None, help="most timed steps per variant "
                    "(default: CPU 40, CUDA 200)")
    ap.add_argument("--min-repeats", type=int, default=5, help="fewest timed steps per variant (default 5)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop timing a variant after this long once --min-repeats are done "
                         "(default: CPU 3, CUDA 5)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="time the variants round-robin in this many rounds, each with its own warm-up "
                         "(default: CPU 3, CUDA 1; --quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: CPU 3, CUDA 10)")
    ap.add_argument("--copy-mib", type=int, default=None, help="size of each bandwidth-floor tensor "
                    "(default: CPU 256, CUDA 1024)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true",
                    help="ResNet-50 shapes only (unless --models), 2 warm-up and 5 timed steps")
    ap.add_argument("--compile-models", default=None,
                    help="models on which the torch.compile variant runs (default: CPU resnet50 only, "
                         "compiling takes minutes on a few cores; CUDA: all)")
    ap.add_argument("--compile-budget", type=float, default=600.0,
                    help="give up on torch.compile after this many seconds per model (default 600)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--output", default=DEFAULT_DOC, help="markdown page to update (default docs/benchmarks.md)")
    ap.add_argument("--chart", default=None, help="PNG path (default: bench_step_<device>.png beside --output)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    return ap.parse_args(argv)


def main(argv=None) -> List[Row]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_step: --device cuda but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"bench_step: unsupported device {device}")
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    elif args.quick:
        models = ["resnet50"]
    else:
        models = [m for m, spec in MODELS.items() if m != "tiny" and (on_gpu or spec.cpu_default)]
    variant_names = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"bench_step: unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in variant_names:
        if name not in VARIANTS:
            raise SystemExit(f"bench_step: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    variants = [VARIANTS[n] for n in variant_names]

    quick = args.quick
    s = Settings(
        device=device,
        warmup=args.warmup if args.warmup is not None else (2 if quick else (10 if on_gpu else 3)),
        repeats=args.repeats if args.repeats is not None else (5 if quick else (200 if on_gpu else 40)),
        min_repeats=args.min_repeats,
        max_seconds=args.max_seconds if args.max_seconds is not None else (1.0 if quick else
                                                                            (5.0 if on_gpu else 3.0)),
        memory=not args.no_memory,
        rounds=max(1, args.rounds if args.rounds is not None else (1 if quick or on_gpu else 3)),
    )
    s.min_repeats = min(s.min_repeats, s.repeats)
    if args.compile_models is not None:
        s.compile_models = [m.strip() for m in args.compile_models.split(",") if m.strip()]
    else:
        s.compile_models = models if on_gpu else [m for m in models if m in ("resnet50", "tiny")]
    s.compile_budget = args.compile_budget
    copy_mib = args.copy_mib or (1024 if on_gpu else 256)

    run_versions = versions()  # at the start: the code that runs, not HEAD when the run ends
    load_before = os.getloadavg()
    print(f"bench_step: {device_name(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load {load_before[0]:.2f}")
    floor = BandwidthFloor(device, copy_mib, repeats=5 if quick else 10)
    s.floor = floor
    floor.measure()
    print(f"  bandwidth floor: {floor.gbps:.1f} GB/s")

    all_rows: Dict[str, List[Row]] = {}
    kept: Dict[str, dict] = {}
    shapes: Dict[str, List[Shape]] = {}
    for model in models:
        shapes[model] = MODELS[model].shapes()
        print(f"{model}: {len(shapes[model])} tensors, {numel(shapes[model]) / 1e6:.2f}M params")
        kept[model] = {}
        all_rows[model] = run_model(model, shapes[model], variants, s, kept=kept[model])
    floor.measure()
    print(f"  {floor.describe()}")
    if s.memory and not on_gpu:
        measure_cpu_memory(all_rows, shapes, variants, kept)
    kept.clear()
    load_after = os.getloadavg()

    rows = [r for model in models for r in all_rows[model]]
    info = RunInfo(
        device=device_name(device), device_type=device.type,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions=run_versions, threads=torch.get_num_threads(), load_before=load_before, load_after=load_after,
        copy_gbps=floor.gbps, floor_detail=floor.describe(),
        command="python tools/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings=f"{s.rounds} round(s), each with {s.warmup} warm-up steps; up to {s.repeats} timed steps "
                 f"in all, at least {s.min_repeats}, stopping after {s.max_seconds:g} s per variant",
    )
    chart = None
    if not args.no_write:
        chart = args.chart or os.path.join(os.path.dirname(os.path.abspath(args.output)),
                                           f"bench_step_{device.type}.png")
        write_chart(chart, rows, info)
    body = section(rows, info, chart)
    print(body)
    if not args.no_write:
        write_doc(args.output, device.type, body)
        print(f"wrote {args.output} and {chart}")
    return rows


if __name__ == "__main__":
    main()
