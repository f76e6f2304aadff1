"""Run description (device, versions), the targets' verdicts and the markdown section of one run."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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
            detail = f"{timm_fe.ms:.2f} / {fused.ms:.2f} ms = {ratio:.2f}×"
            if fused.op_bytes and timm_fe.op_bytes:
                # ratio = (bytes ratio) x (our GB/s / timm's GB/s), both counted from the ops' bytes.
                byte_ratio = timm_fe.op_bytes / fused.op_bytes
                detail += (f" = bytes {timm_fe.op_bytes / timm_fe.params:.0f} / "
                           f"{fused.op_bytes / fused.params:.0f} B/param ({byte_ratio:.2f}×, the bound at equal "
                           f"bandwidth) × our ops' GB/s over timm's ({ratio / byte_ratio:.2f}×)")
            targets.append(Target(text, "met" if ratio >= 6 else "not met", detail))
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
        triton, cuda, adamw = (get("gpt2-2048", v) for v in ("ours-fused-triton", "ours-fused", "adamw-fused"))
        text = "GPU, gpt2-2048 shapes: ours Triton kernel within 10% of our CUDA kernel ms/step"
        if triton and cuda:
            ratio = triton.ms / cuda.ms
            targets.append(Target(text, "met" if ratio <= 1.10 else "not met",
                                  f"{triton.ms:.2f} / {cuda.ms:.2f} ms = {ratio:.2f}×"))
        else:
            targets.append(Target(text, "not evaluated",
                                  missing(("gpt2-2048", "ours-fused-triton"), ("gpt2-2048", "ours-fused"))))
        text = "GPU, gpt2-2048 shapes: ours Triton kernel ≥ torch AdamW(fused=True) in GB/s (per byte moved)"
        if triton and adamw:
            targets.append(Target(text, "met" if triton.gbps() >= adamw.gbps() else "not met",
                                  f"{triton.gbps():.0f} vs {adamw.gbps():.0f} GB/s"))
        else:
            targets.append(Target(text, "not evaluated",
                                  missing(("gpt2-2048", "ours-fused-triton"), ("gpt2-2048", "adamw-fused"))))
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
