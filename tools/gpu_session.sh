#!/usr/bin/env bash
# Everything issue 13 measures on a GPU machine, in stages, each with its own time limit and log, so
# that one short lease covers it and a stage that fails or hangs does not cost the others:
#
#   build   adan_plugin._C with its CUDA kernels for the visible GPU, and (when OFFICIAL_ADAN names a
#           copy of sail-sg/Adan kept outside this repository) the official fused_adan extension in place
#           there, in parallel;
#   checks  tools/gpu_checks.sh: the CUDA/Triton test files and compute-sanitizer memcheck and synccheck;
#   train   the digits demo (tools/train_timm.py, the README's recipe) on the CPU, then on CUDA with the
#           fused kernels under AMP bf16 and AMP fp16 + GradScaler; top-1 of each, same machine, same run;
#   bench   tools/bench_step.py --device cuda (docs/benchmarks.md's CUDA section and chart);
#   tests, sanitizers
#           the two halves of checks, for a lease that runs other stages between them;
#   q8bench the bench part of q8 alone (after tests);
#   profile Nsight Compute (SpeedOfLight, memory, occupancy, launch statistics) of each fused kernel on
#           one 16M-element tensor (tools/profile_kernels.py), when ncu runs on the machine;
#   q8      not in the default list: the 8-bit GPU kernels alone, for a short lease after a change to them
#           (tests/test_cuda_lowmem.py, the 8-bit tests of tests/test_triton_cuda.py, then the GPT-2 bench
#           rows of both 8-bit kernels next to torch's fused AdamW, as docs/benchmarks.md's supplementary
#           run): tools/gpu_session.sh LOGDIR build q8.
#
# Usage (repository root): tools/gpu_session.sh LOGDIR [STAGE ...]      (default: all four, in order)
# PY picks the interpreter (default python3); OFFICIAL_ADAN the official copy (default .ext/sail-adan);
# BENCH_ARGS extra arguments for the bench; TRAIN_RUNS the train stage's runs, DEVICE:ARGS separated by ';'
# (default "cpu:;cuda:--amp --amp-dtype bfloat16;cuda:--amp --amp-dtype float16").  LOGDIR gets build.log, gpu_checks.log, train.log,
# bench.log, and bench.tar (docs/benchmarks.md and its chart after the run).
set -uo pipefail
cd "$(dirname "$0")/.."
LOGDIR=${1:?usage: tools/gpu_session.sh LOGDIR [build|checks|train|bench ...]}
shift
STAGES=${*:-build checks train bench}
PY=${PY:-python3}
OFFICIAL_ADAN=${OFFICIAL_ADAN:-.ext/sail-adan}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$LOGDIR"
jobs=$(nproc)

stage_build() {
    local cap
    cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    {
        echo "== $(date -u '+%F %T UTC'): build for sm_${cap/./}, $jobs jobs"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
        nvcc --version | tail -2
        if [ -f "$OFFICIAL_ADAN/setup.py" ]; then
            (cd "$OFFICIAL_ADAN" && TORCH_CUDA_ARCH_LIST=$cap FORCE_CUDA=1 MAX_JOBS=4 timeout 400 "$PY" setup.py \
                build_ext --inplace > official_build.log 2>&1; echo "official fused_adan build: exit $?" >> official_build.log) &
        fi
        start=$(date +%s)
        TORCH_CUDA_ARCH_LIST=$cap FORCE_CUDA=1 MAX_JOBS=$jobs timeout 420 "$PY" setup.py build_ext --inplace -q 2>&1 \
            | grep -v "^W\|warning" | tail -30
        echo "adan_plugin build: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
        wait
        [ -f "$OFFICIAL_ADAN/official_build.log" ] && tail -5 "$OFFICIAL_ADAN/official_build.log"
        "$PY" -c "import torch; from adan_plugin import _ext; print('CUDA kernels:', _ext.fused_supported(torch.device('cuda')))"
    } > "$LOGDIR/build.log" 2>&1
}

run_checks() {  # run_checks NAME TIMEOUT [SECTIONS]: tools/gpu_checks.sh into LOGDIR/NAME.log
    GPU_CHECKS=${3:-} PY=$PY timeout "$2" tools/gpu_checks.sh "$LOGDIR/$1.log" > /dev/null 2>&1
    echo "$1: exit $?" >> "$LOGDIR/$1.log"
}

stage_checks() { run_checks gpu_checks 380; }

stage_train() {
    {
        echo "== $(date -u '+%F %T UTC')"
        IFS=';' read -ra runs <<< "${TRAIN_RUNS:-cpu:;cuda:--amp --amp-dtype bfloat16;cuda:--amp --amp-dtype float16}"
        for run in "${runs[@]}"; do
            device=${run%%:*}
            extra=${run#*:}
            echo "== digits demo on $device ${extra:-(fp32)}"
            # shellcheck disable=SC2086
            timeout 150 "$PY" tools/train_timm.py --config configs/timm/demo/digits_test_resnet.yaml \
                --device "$device" $extra --output "/tmp/adan_train_${device}_${extra// /_}" --log-interval 1000 --plot false
            echo "exit $?"
        done
    } > "$LOGDIR/train.log" 2>&1
}

stage_bench() {
    # shellcheck disable=SC2086
    timeout 330 "$PY" tools/bench_step.py --device cuda --official-adan "$OFFICIAL_ADAN" ${BENCH_ARGS:-} \
        > "$LOGDIR/bench.log" 2>&1
    echo "bench: exit $?" >> "$LOGDIR/bench.log"
    tar -cf "$LOGDIR/bench.tar" docs/benchmarks.md docs/*.png 2>/dev/null
}

stage_tests() { run_checks tests 240 tests; }

stage_sanitizers() { run_checks sanitizers 240 sanitizers; }

q8_bench() {
    timeout 200 "$PY" tools/bench_step.py --device cuda --models gpt2-2048,gpt2-1536 --no-memory --max-seconds 1 \
        --variants ours-fused-8bit,ours-fused-triton-8bit,ours-fused-bf16,ours-fused-triton-bf16,adamw-fused
    echo "bench: exit $?"
}

stage_q8() {
    {
        echo "== $(date -u '+%F %T UTC')"
        TRITON_INTERPRET=0 timeout 200 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_cuda_lowmem.py \
            tests/test_triton_cuda.py -k "8bit or q8 or quant or kahan"
        echo "tests: exit $?"
        q8_bench
    } > "$LOGDIR/q8.log" 2>&1
    tar -cf "$LOGDIR/q8_bench.tar" docs/benchmarks.md docs/*.png 2>/dev/null
}

stage_q8bench() {
    { echo "== $(date -u '+%F %T UTC')"; q8_bench; } > "$LOGDIR/q8bench.log" 2>&1
    tar -cf "$LOGDIR/q8_bench.tar" docs/benchmarks.md docs/*.png 2>/dev/null
}

stage_profile() {
    local ncu
    ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    {
        echo "== $(date -u '+%F %T UTC') ncu: ${ncu:-not found}"
        [ -n "$ncu" ] && timeout 150 "$ncu" --section SpeedOfLight --section MemoryWorkloadAnalysis \
            --section Occupancy --section LaunchStats -k regex:adan "$PY" tools/profile_kernels.py
        echo "profile: exit $?"
    } > "$LOGDIR/profile.log" 2>&1
}

for stage in $STAGES; do
    echo "== stage $stage ($(date -u '+%T'))"
    "stage_$stage"
    tail -4 "$LOGDIR/${stage/#checks/gpu_checks}.log" 2>/dev/null
done
echo "== done ($(date -u '+%T'))"
