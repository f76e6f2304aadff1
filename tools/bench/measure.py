"""Timing of a step, the streaming-bandwidth floor, peak-memory probes (CPU resident set, CUDA) and the
bytes a step's ops read and write."""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Callable, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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


class ComputeProbe:
    """How steady the host's arithmetic was: ``torch.exp`` on 2^20 fp32 elements (4 MiB, in cache; bound
    by the vector units, not by memory) with all threads, timed each time the floor is measured.  Steps
    bound by arithmetic (8-bit states on a CPU) slow down when other guests share the host's cores while
    memory-bound ones (AdamW) barely do, so a wide spread here flags a run whose ratios moved with it."""

    N = 2 ** 20

    def __init__(self, device: torch.device, repeats: int = 30):
        self.device, self.repeats = device, repeats
        self.ns: List[float] = []

    def measure(self) -> None:
        x = torch.empty(self.N, device=self.device).uniform_(-1.0, 1.0)
        out = torch.empty_like(x)
        kw = dict(warmup=2, repeats=self.repeats, min_repeats=self.repeats, max_seconds=float("inf"))
        self.ns.append(statistics.median(time_fn(lambda: torch.exp(x, out=out), self.device, **kw)) / self.N * 1e9)

    def describe(self) -> str:
        return (f"`torch.exp` on 2^20 fp32 elements (in cache), median of {self.repeats} calls: "
                f"{min(self.ns):.3f}–{max(self.ns):.3f} ns per element over {len(self.ns)} measurements "
                f"(max/min {max(self.ns) / min(self.ns):.2f})")


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


# ------------------------------------------------------------------------------ bytes the ops move
# In-place ops whose destination is only written, never read.
_WRITE_ONLY_SELF = frozenset({"zero_", "fill_", "copy_", "_foreach_zero_", "_foreach_copy_"})
# Allocations that write nothing.
_UNFILLED_FACTORIES = ("empty", "new_empty", "empty_like", "empty_strided")


class OpBytes(TorchDispatchMode):
    """Bytes the aten (and custom) ops of a call read and write, from each op's schema.

    Every tensor argument is read once per op (a tensor passed twice, like ``addcmul_(s, d, d)``'s
    ``d``, counts once), except the destination of a write-only op (``zero_``, ``copy_``, an ``out=``
    argument); every argument the schema marks mutable and every freshly allocated output is written.
    View ops move nothing, nor do unfilled allocations (``empty``).  On tensors much larger than the
    caches each op streams its operands from memory, so this is what an implementation's step costs in
    memory traffic: one pass of ours fused is 44 B per fp32 parameter, a chain of ``_foreach_*`` passes
    is the sum of its passes.  Ops that declare more than they touch count what they declare
    (torch's ``_fused_adamw_`` marks its gradients mutable)."""

    def __init__(self):
        super().__init__()
        self.read = 0
        self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        name = schema.name.split("::")[-1]
        if name.startswith(_UNFILLED_FACTORIES):
            return out
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        if not mutates and any(r.alias_info is not None for r in schema.returns):
            return out  # a view
        read, written = {}, {}
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            is_write = arg.alias_info is not None and arg.alias_info.is_write
            # out= style destinations (`out`, or `values`/`indices` of a .out overload) are keyword-only.
            write_only = is_write and (arg.kwarg_only or (i == 0 and name in _WRITE_ONLY_SELF))
            for t in _tensors(value):
                if not write_only:
                    read[_key(t)] = _tensor_bytes(t)
                if is_write:
                    written[_key(t)] = _tensor_bytes(t)
        for ret, value in zip(schema.returns, out if isinstance(out, tuple) else (out,)):
            if ret.alias_info is None:
                for t in _tensors(value):
                    written[_key(t)] = _tensor_bytes(t)
        self.read += sum(read.values())
        self.written += sum(written.values())
        return out

    @property
    def total(self) -> int:
        return self.read + self.written


def _tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _key(t: torch.Tensor):
    return (t.data_ptr(), t.numel(), t.dtype)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Memory a tensor spans: its element count, or less for a broadcast (zero-stride) view."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


def op_bytes(fn: Callable[[], object]) -> int:
    """Bytes read + written by the ops of one call of ``fn`` (see :class:`OpBytes`)."""
    with OpBytes() as counter:
        fn()
    return counter.total
