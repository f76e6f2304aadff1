#!/usr/bin/env python
"""Time ``optimizer.step()`` on the parameter shapes of real models.

    python tools/bench_step.py                      # CPU: resnet50, vit_base_patch16_224, convnext_tiny
    python tools/bench_step.py --device cuda        # adds ResNet-101, ViT-S/16, GPT-2 (24 layers, width 1536, 2048)
    python tools/bench_step.py --device cuda --official-adan /path/to/sail-sg/Adan   # + official FusedAdan rows
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
import datetime
import os
import subprocess
import sys
from typing import Dict, List

import torch

from bench.doc import HEADER, PLACEHOLDER, SECTION_BEGIN, SECTION_END, _extract, write_chart, write_doc
from bench.measure import BandwidthFloor, ComputeProbe, CpuPeakMemory, cuda_peak_memory, time_fn
from bench.report import (CPU_ISAS, REPO_ROOT, RunInfo, Target, best_cpu_isa, cpu_kernels, device_name,
                          evaluate_targets, ours_cpu_isa, peak_mb, ratio_target, readme_table, results_table, section, versions)
from bench.run import (Bench, Row, Settings, compile_warmup, fits_in_memory, measure_cpu_memory, paired_ratios,
                       run_model)
from bench.shapes import MODELS, ModelSpec, Shape, gpt2_shapes, numel, timm_shapes
from bench.variants import (ADAMW_HP, ADAN_HP, VARIANTS, OfficialAdan, Unavailable, Variant, state_bytes,
                            step_bytes)

DEFAULT_DOC = os.path.join(REPO_ROOT, "docs", "benchmarks.md")

# Re-exported: the names tests/test_bench_step.py (and callers of the former single-file tool) use.
__all__ = [
    "ADAMW_HP", "ADAN_HP", "HEADER", "MODELS", "PLACEHOLDER", "REPO_ROOT", "SECTION_BEGIN", "SECTION_END",
    "VARIANTS", "OfficialAdan", "BandwidthFloor", "Bench", "CpuPeakMemory", "ModelSpec", "Row", "RunInfo", "Settings", "Shape",
    "Target", "Unavailable", "Variant", "_extract", "best_cpu_isa", "compile_warmup", "cuda_peak_memory", "device_name",
    "evaluate_targets", "fits_in_memory", "gpt2_shapes", "main", "measure_cpu_memory", "numel",
    "paired_ratios", "parse_args", "peak_mb", "readme_table", "ratio_target", "results_table", "run_model", "section", "state_bytes", "step_bytes", "time_fn",
    "timm_shapes", "versions", "write_chart", "write_doc",
]


# -------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    ap.add_argument("--models", default=None,
                    help=f"comma list from {', '.join(MODELS)} (default: CPU: resnet50, vit_base_patch16_224, "
                         "convnext_tiny; CUDA: those, resnet101, vit_small_patch16_224 and both GPT-2)")
    ap.add_argument("--variants", default=None, help=f"comma list from {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--repeats", type=int, default=None, help="most timed steps per variant "
                    "(default: CPU 40, CUDA 100)")
    ap.add_argument("--min-repeats", type=int, default=5, help="fewest timed steps per variant (default 5)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop timing a variant after this long once --min-repeats are done "
                         "(default: CPU 3, CUDA 1.5: sized so that seven models x nine variants "
                         "take about two minutes on an H100, an estimate not yet timed)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="time the variants round-robin in this many rounds, each with its own warm-up "
                         "(default: CPU 3, CUDA 1; --quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: CPU 3, CUDA 5)")
    ap.add_argument("--copy-mib", type=int, default=None, help="size of each bandwidth-floor tensor "
                    "(default: CPU 256, CUDA 1024)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--cpu-isa", default=None, choices=sorted(CPU_ISAS),
                    help="CPU: run our kernels and torch's (AdamW's) with at most this instruction set, as on a "
                         "CPU that has only it (ADAN_PLUGIN_CPU_ISA and ATEN_CPU_CAPABILITY, which must be set "
                         "before torch runs a kernel: the tool runs itself again with them); a run capped below "
                         "the CPU's best gets its own section, cpu-<isa>")
    ap.add_argument("--quick", action="store_true",
                    help="ResNet-50 shapes only (unless --models), 2 warm-up and 5 timed steps")
    ap.add_argument("--compile-models", default=None,
                    help="models on which the torch.compile variant runs (default: CPU resnet50 only, "
                         "compiling takes minutes on a few cores; CUDA: none, name them to run it)")
    ap.add_argument("--compile-budget", type=float, default=600.0,
                    help="give up on torch.compile after this many seconds per model (default 600)")
    ap.add_argument("--official-adan", default=None, metavar="PATH",
                    help="directory of the official sail-sg/Adan code: its adan.py and the fused_adan CUDA "
                         "extension built in place (python setup.py build_ext --inplace); without it the "
                         "official-fused rows say n/a")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--output", default=DEFAULT_DOC, help="markdown page to update (default docs/benchmarks.md)")
    ap.add_argument("--chart", default=None, help="PNG path (default: bench_step_<device>.png beside --output)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    return ap.parse_args(argv)


def _run_capped(isa: str, argv: List[str]) -> None:
    """Run this tool again with the kernels capped to ``isa`` (unless this process already is)."""
    want = {"ADAN_PLUGIN_CPU_ISA": isa, "ATEN_CPU_CAPABILITY": CPU_ISAS[isa]}
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env={**os.environ, **want})
    raise SystemExit(proc.returncode)


def main(argv=None) -> List[Row]:
    args = parse_args(argv)
    if args.cpu_isa:
        _run_capped(args.cpu_isa, list(argv if argv is not None else sys.argv[1:]))
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
    OfficialAdan.set_path(args.official_adan)

    quick = args.quick
    s = Settings(
        device=device,
        warmup=args.warmup if args.warmup is not None else (2 if quick else (5 if on_gpu else 3)),
        repeats=args.repeats if args.repeats is not None else (5 if quick else (100 if on_gpu else 40)),
        min_repeats=args.min_repeats,
        max_seconds=args.max_seconds if args.max_seconds is not None else (1.0 if quick else
                                                                            (1.5 if on_gpu else 3.0)),
        memory=not args.no_memory,
        rounds=max(1, args.rounds if args.rounds is not None else (1 if quick or on_gpu else 3)),
    )
    s.min_repeats = min(s.min_repeats, s.repeats)
    if args.compile_models is not None:
        s.compile_models = [m.strip() for m in args.compile_models.split(",") if m.strip()]
    else:
        # CUDA: none by default; compiling the step takes minutes per model, more than the rest of a run.
        s.compile_models = [] if on_gpu else [m for m in models if m in ("resnet50", "tiny")]
    s.compile_budget = args.compile_budget
    copy_mib = args.copy_mib or (1024 if on_gpu else 256)

    run_versions = versions()  # at the start: the code that runs, not HEAD when the run ends
    load_before = os.getloadavg()
    print(f"bench_step: {device_name(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load {load_before[0]:.2f}")
    floor = s.floor = BandwidthFloor(device, copy_mib, repeats=5 if quick else 10)
    probe = s.probe = None if on_gpu else ComputeProbe(device)
    s.measure_host()
    print(f"  bandwidth floor: {floor.gbps:.1f} GB/s")

    all_rows: Dict[str, List[Row]] = {}
    kept: Dict[str, dict] = {}
    shapes: Dict[str, List[Shape]] = {}
    for model in models:
        shapes[model] = MODELS[model].shapes()
        print(f"{model}: {len(shapes[model])} tensors, {numel(shapes[model]) / 1e6:.2f}M params")
        kept[model] = {}
        all_rows[model] = run_model(model, shapes[model], variants, s, kept=kept[model])
    s.measure_host()
    print(f"  {floor.describe()}")
    if probe is not None:
        print(f"  compute probe: {probe.describe()}")
    if s.memory and not on_gpu:
        measure_cpu_memory(all_rows, shapes, variants, kept)
    kept.clear()
    load_after = os.getloadavg()

    rows = [r for model in models for r in all_rows[model]]
    ours_isa = "" if on_gpu else ours_cpu_isa()
    isa_cap = ours_isa if ours_isa and ours_isa != best_cpu_isa() else ""
    kind = f"cpu-{isa_cap}" if isa_cap else device.type
    info = RunInfo(
        device=device_name(device), device_type=device.type,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions=run_versions, threads=torch.get_num_threads(), load_before=load_before, load_after=load_after,
        copy_gbps=floor.gbps, floor_detail=floor.describe(), probe_detail=probe.describe() if probe else "",
        command="python tools/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings=f"{s.rounds} round(s), each with {s.warmup} warm-up steps; up to {s.repeats} timed steps "
                 f"in all, at least {s.min_repeats}, stopping after {s.max_seconds:g} s per variant",
        kernels="" if on_gpu else cpu_kernels(), isa_cap=isa_cap,
    )
    chart = None
    if not args.no_write:
        chart = args.chart or os.path.join(os.path.dirname(os.path.abspath(args.output)),
                                           f"bench_step_{kind}.png")
        write_chart(chart, rows, info)
    body = section(rows, info, chart)
    print(body)
    if not args.no_write:
        write_doc(args.output, kind, body)
        print(f"wrote {args.output} and {chart}")
    return rows


if __name__ == "__main__":
    main()
