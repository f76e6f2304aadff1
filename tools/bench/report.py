"""Run description (device, versions), the targets' verdicts and the markdown section of one run."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.run import Row, _meminfo
from bench.shapes import MODELS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    probe_detail: str = ""
    kernels: str = ""  # CPU: the instruction sets ours and torch's kernels ran with
    isa_cap: str = ""  # CPU: the build both were capped to (--cpu-isa), "" for the CPU's best


def _cpuinfo_field(name: str) -> str:
    """The first value of ``name`` in /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    family = _cpuinfo_field("cpu family")
    if family:  # "AMD EPYC" alone names no generation: family 25 model 17 is Zen 4 (Genoa)
        model += f" (family {family}, model {_cpuinfo_field('model')})"
    mem = _meminfo("MemTotal")
    return f"{model}, {os.cpu_count()} logical CPUs" + (f", {mem / 2**30:.0f} GiB RAM" if mem else "")


# adan_plugin's CPU builds (csrc/adan_cpu.cpp) and the ATEN_CPU_CAPABILITY that runs torch's kernels
# (AdamW's among them) on the same instructions.
CPU_ISAS = {"base": "default", "avx2": "avx2", "avx512": "avx512", "avx512_bf16": "avx512"}


def best_cpu_isa() -> str:
    """The best of adan_plugin's CPU builds this CPU can run, from its flags (Linux; "base" elsewhere)."""
    flags = set(_cpuinfo_field("flags").split())
    if not {"avx2", "fma", "f16c"} <= flags:
        return "base"
    if not {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "avx2"
    return "avx512_bf16" if "avx512_bf16" in flags else "avx512"


def ours_cpu_isa() -> str:
    """The build adan_plugin's CPU kernels run in this process ("" when not built or refused)."""
    try:
        from adan_plugin import _ext
        return torch.ops.adan_plugin._cpu_isa() if _ext.extension_loaded() else ""
    except RuntimeError:  # a bad ADAN_PLUGIN_CPU_ISA
        return ""


def cpu_kernels() -> str:
    """Which instruction sets this process's CPU kernels use: ours and torch's (AdamW's)."""
    ours = ours_cpu_isa() or "not available"
    caps = [f"{k}={os.environ[k]}" for k in ("ADAN_PLUGIN_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(k)]
    return (f"adan_plugin CPU build {ours}, torch CPU capability {torch.backends.cpu.get_cpu_capability()} "
            f"(this CPU's best build: {best_cpu_isa()}" + (f"; capped by {', '.join(caps)}" if caps else "") + ")")


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


Lookup = Dict[Tuple[str, str], Row]


def _usable(look: Lookup, model: str, variant: str) -> Optional[Row]:
    """The row of ``variant`` on ``model``'s shapes when it ran and was timed, else None."""
    r = look.get((model, variant))
    return r if r is not None and r.reason is None and r.times else None


def _missing(look: Lookup, *keys: Tuple[str, str]) -> str:
    """Why a target that needs the rows ``keys`` (``(model, variant)``) could not be judged: each row
    that is not usable, and why."""
    out = []
    for model, variant in keys:
        r = look.get((model, variant))
        if r is None:
            out.append(f"{model}/{variant}: not run")
        elif r.reason is not None:
            out.append(f"{model}/{variant}: n/a ({r.reason})")
        elif not r.times:
            out.append(f"{model}/{variant}: no timed steps")
    return "; ".join(out)


def ratio_target(look: Lookup, text: str, model: str, variant: str, baseline: str, limit: float, *,
                 at_least: bool = False, metric: str = "ms",
                 explain: Optional[Callable[[Row, Row, float], str]] = None) -> Target:
    """The target "``variant``'s ``metric`` / ``baseline``'s ≤ ``limit``" (``at_least``: ≥) on ``model``'s
    shapes, judged from one run's rows; "not evaluated", with what is missing, when either row is.

    ``metric``: ``"ms"`` (median ms/step) or ``"gbps"`` (GB/s of the bytes the step must move).
    ``explain(row, baseline_row, ratio)``: more detail, appended to the numbers.
    """
    row, base = _usable(look, model, variant), _usable(look, model, baseline)
    if row is None or base is None:
        return Target(text, "not evaluated", _missing(look, (model, variant), (model, baseline)))
    value, ref = (row.ms, base.ms) if metric == "ms" else (row.gbps(), base.gbps())
    ratio = value / ref
    unit, digits = ("ms", 2) if metric == "ms" else ("GB/s", 0)
    detail = f"{value:.{digits}f} / {ref:.{digits}f} {unit} = {ratio:.2f}×"
    paired = row.paired.get(baseline) if metric == "ms" else None
    if paired:
        # Judged on the steps timed back to back (bench.run.paired_ratios); the rounds' ratio is shown too.
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        detail = (f"step against step: median {q[1]:.2f}× of {len(paired)} paired steps (quartiles "
                  f"{q[0]:.2f}–{q[2]:.2f}×); rounds' medians {detail}")
        ratio = q[1]
    met = ratio >= limit if at_least else ratio <= limit
    if explain is not None:
        detail += explain(row, base, ratio)
    return Target(text, "met" if met else "not met", detail)


def _bytes_and_bandwidth(timm_fe: Row, fused: Row, ratio: float) -> str:
    """Split a time ratio into the bytes ratio (the bound at equal bandwidth) and the bandwidth ratio."""
    if not (fused.op_bytes and timm_fe.op_bytes):
        return ""
    byte_ratio = timm_fe.op_bytes / fused.op_bytes
    return (f" = bytes {timm_fe.op_bytes / timm_fe.params:.0f} / {fused.op_bytes / fused.params:.0f} B/param "
            f"({byte_ratio:.2f}×, the bound at equal bandwidth) × our ops' GB/s over timm's "
            f"({ratio / byte_ratio:.2f}×)")


# Issue 11: ours fused against torch's AdamW(fused=True), per state dtype, on the CPU.
CPU_ADAMW_TARGETS = (
    ("resnet50", "ResNet-50", "ours-fused", "fp32", "1.65"),
    ("resnet50", "ResNet-50", "ours-fused-bf16", "bf16 state", "1.15"),
    ("resnet50", "ResNet-50", "ours-fused-8bit", "8-bit state", "1.0"),
    ("vit_base_patch16_224", "ViT-B/16", "ours-fused-bf16", "bf16 state", "1.15"),
    ("vit_base_patch16_224", "ViT-B/16", "ours-fused-8bit", "8-bit state", "1.0"),
)


def evaluate_targets(rows: Sequence[Row], info: RunInfo) -> List[Target]:
    """The issue's targets, from this run's numbers only."""
    look = _row_lookup(rows)

    def get(model, variant) -> Optional[Row]:
        return _usable(look, model, variant)

    targets: List[Target] = []
    for model in dict.fromkeys(r.model for r in rows):
        eight = get(model, "ours-fused-8bit")
        if model in ("resnet50", "vit_base_patch16_224") and eight and eight.state_bytes:
            per = eight.state_bytes / eight.params
            targets.append(Target(f"{model}, ours-fused-8bit: state ≤ 4.5 B/param (fp32 Adan: 16, AdamW: 8)",
                                  "met" if per <= 4.5 else "not met",
                                  f"{eight.state_bytes / 2**20:.1f} MiB / {eight.params / 1e6:.2f}M params = "
                                  f"{per:.3f} B/param (scales and fp32 states of small tensors included)"))
        for variant in ("ours-fused", "ours-fused-bf16", "ours-fused-triton", "ours-fused-8bit"):
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
        for model, name, variant, what, limit in CPU_ADAMW_TARGETS:
            targets.append(ratio_target(
                look, f"CPU, {name} shapes, {what}: ours fused ≤ {limit}× torch AdamW(fused=True) ms/step",
                model, variant, "adamw-fused", float(limit)))
        targets.append(ratio_target(
            look, "CPU, ResNet-50 shapes, fp32: ours fused ≥ 6× faster than timm Adan foreach",
            "resnet50", "timm-foreach", "ours-fused", 6.0, at_least=True, explain=_bytes_and_bandwidth))
    else:
        fused = get("gpt2-2048", "ours-fused")
        text = "GPU, GPT-2 width 2048 (1.3B) shapes: ours fused ≥ 85% of the measured copy bandwidth (floor)"
        if fused:
            pct = 100 * fused.gbps() / info.copy_gbps
            targets.append(Target(text, "met" if pct >= 85 else "not met",
                                  f"{fused.gbps():.0f} / {info.copy_gbps:.0f} GB/s = {pct:.1f}%"))
        else:
            targets.append(Target(text, "not evaluated", _missing(look, ("gpt2-2048", "ours-fused"))))
        targets.append(ratio_target(
            look, "GPU, gpt2-2048 shapes: ours Triton kernel within 10% of our CUDA kernel ms/step",
            "gpt2-2048", "ours-fused-triton", "ours-fused", 1.10))
        targets.append(ratio_target(
            look, "GPU, gpt2-2048 shapes: ours Triton kernel ≥ torch AdamW(fused=True) in GB/s (per byte moved)",
            "gpt2-2048", "ours-fused-triton", "adamw-fused", 1.0, at_least=True, metric="gbps"))
        for model in ("gpt2-1536", "gpt2-2048"):
            targets.append(ratio_target(
                look, f"GPU, {model} shapes: ours fused bf16 state no slower than torch AdamW(fused=True) fp32",
                model, "ours-fused-bf16", "adamw-fused", 1.0))
            targets.append(ratio_target(
                look, f"GPU, {model} shapes: ours fused bf16 state, Triton kernel, no slower than torch "
                "AdamW(fused=True) fp32", model, "ours-fused-triton-bf16", "adamw-fused", 1.0))
        for model in ("gpt2-1536", "gpt2-2048"):
            targets.append(ratio_target(
                look, f"GPU, {model} shapes: ours fused ≤ 0.75× official FusedAdan ms/step",
                model, "ours-fused", "official-fused", 0.75))
        for model in dict.fromkeys(r.model for r in rows):
            for variant in ("ours-fused", "ours-fused-bf16"):
                targets.append(_peak_target(look, model, variant, 0.01))
    return targets


def _peak_target(look: Lookup, model: str, variant: str, share: float) -> Target:
    """GPU: the memory one step allocates beyond parameters, gradients and states ≤ ``share`` of the
    parameters' size (fp32 parameters: 4 bytes each)."""
    text = f"GPU, {model}, {variant}: peak memory beyond states ≤ {100 * share:g}% of the parameters' size"
    r = _usable(look, model, variant)
    if r is None:
        return Target(text, "not evaluated", _missing(look, (model, variant)))
    if r.peak_extra is None:
        return Target(text, "not evaluated", f"peak memory n/a ({r.peak_reason or 'not measured'})")
    size = 4 * r.params
    return Target(text, "met" if r.peak_extra <= share * size else "not met",
                  f"{r.peak_extra / 2**20:.2f} MiB / {size / 2**20:.1f} MiB = {100 * r.peak_extra / size:.3f}%")


def _mib(n: Optional[int]) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def results_table(rows: Sequence[Row], info: RunInfo) -> str:
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        mrows = [r for r in rows if r.model == model]
        n = mrows[0].params
        lines += ["", f"#### {model} ({MODELS[model].description if model in MODELS else model}: "
                  f"{n / 1e6:.2f}M parameters, {n * 4 / 2**20:.0f} MiB fp32)", "",
                  "| variant | ms/step (median) | min–max ms | steps | B/param | ops' B/param | GB/s "
                  "| % of floor | state MiB | peak MiB beyond states |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mrows:
            if r.reason is not None:
                lines.append(f"| {r.label} | n/a ({r.reason}) | | | | | | | | |")
                continue
            gbps = r.gbps()
            peak = _mib(r.peak_extra) if r.peak_reason is None else f"n/a ({r.peak_reason})"
            label = r.label + (f" (compile {r.compile_s:.0f} s)" if r.compile_s is not None else "")
            ops = "–" if r.op_bytes is None else f"{r.op_bytes / r.params:.1f}"
            lines.append(
                f"| {label} | {r.ms:.2f} | {min(r.times) * 1e3:.2f}–{max(r.times) * 1e3:.2f} | {len(r.times)} "
                f"| {r.bytes / r.params:.2f} | {ops} | {gbps:.1f} | {100 * gbps / info.copy_gbps:.0f}% "
                f"| {_mib(r.state_bytes)} | {peak} |")
    return "\n".join(lines)


# The official README's "Memory and Efficiency" table: Adam(W), Adan unfused, Adan fused, the official FusedAdan.
README_COLUMNS = (("adamw-fused", "AdamW fused"), ("ours-foreach", "ours unfused"), ("ours-fused", "ours fused"),
                  ("official-fused", "official FusedAdan"))


def peak_mb(r: Row) -> Optional[float]:
    """Parameters + gradients (fp32) + optimizer state + the step's own peak beyond them, in MB (10^6 bytes,
    the unit of the official table); None without a peak measurement."""
    if r.reason is not None or r.peak_extra is None:
        return None
    return (8 * r.params + r.state_bytes + r.peak_extra) / 1e6


def readme_table(rows: Sequence[Row]) -> str:
    """One row per model in the form of the official Adan README's "Memory and Efficiency" table: model
    size, peak MB and the time of 200 steps (200 × the median ms/step) for the four columns' variants."""
    look = _row_lookup(rows)
    head = (["Model", "Model size (M params)"] + [f"{label} peak (MB)" for _, label in README_COLUMNS]
            + [f"{label} time, 200 steps (ms)" for _, label in README_COLUMNS])
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for model in dict.fromkeys(r.model for r in rows):
        n = next(r.params for r in rows if r.model == model)
        peaks, times = [], []
        for variant, _ in README_COLUMNS:
            r = look.get((model, variant))
            mb = peak_mb(r) if r is not None else None
            peaks.append("n/a" if mb is None else f"{mb:.0f}")
            times.append(f"{200 * r.ms:.1f}" if r is not None and r.reason is None and r.times else "n/a")
        lines.append(f"| {model} | {n / 1e6:.1f} | " + " | ".join(peaks + times) + " |")
    return "\n".join(lines)


README_TABLE_TEXT = (
    "Peak memory and time in the form of the official Adan README's \"Memory and Efficiency\" table. "
    "**peak MB** here = fp32 parameters + fp32 gradients + the optimizer's state tensors + the most one "
    "`optimizer.step()` allocates beyond them (the peak-memory column of the tables below), in 10^6 bytes; "
    "\"n/a\" where the variant did not run or its peak was not measured.  The official table measured a "
    "whole training step (model activations included), so its absolute numbers are larger and only the "
    "differences between columns of one row compare between the two tables.  **time, 200 steps** = "
    "200 × the median ms/step below.  \"ours unfused\" is `Adan(foreach=True, fused=False)`; "
    "\"official FusedAdan\" is sail-sg/Adan's `Adan(foreach=True, fused=True)` (its multi-tensor kernel).")


def section(rows: Sequence[Row], info: RunInfo, chart: Optional[str]) -> str:
    targets = evaluate_targets(rows, info)
    v = info.versions
    out = [
        f"### Run: {info.device_type.upper()}" + (f", kernels capped to {info.isa_cap.upper()}" if info.isa_cap else "")
        + f" — {info.device}", "",
        f"- date: {info.date}",
        f"- versions: torch {v['torch']}, timm {v['timm']}, mmpretrain {v['mmpretrain']}, "
        f"python {v['python']}, adan_plugin commit {v['adan_plugin']} at the start of the run "
        f"(extension adan_plugin._C: {v['adan_plugin._C']})",
        f"- command: `{info.command}` ({info.settings})",
        *([f"- kernels: {info.kernels}"] if info.kernels else []),
        f"- torch threads: {info.threads}; load average (1/5/15 min) before: "
        + "/".join(f"{x:.2f}" for x in info.load_before) + ", after: "
        + "/".join(f"{x:.2f}" for x in info.load_after),
        f"- bandwidth floor (bytes read + written / median time): {info.floor_detail}",
        *([f"- compute probe (how steady the host's arithmetic was): {info.probe_detail}"]
          if info.probe_detail else []),
        "", "Targets (ratios from this run only):", "",
        "| target | result | numbers |", "|---|---|---|",
    ]
    out += [f"| {t.text} | **{t.verdict}** | {t.detail} |" for t in targets]
    out += ["", README_TABLE_TEXT, "", readme_table(rows)]
    out.append(results_table(rows, info))
    if chart:
        out += ["", f"![step time per variant, {info.device_type}]({os.path.basename(chart)})"]
    return "\n".join(out)
