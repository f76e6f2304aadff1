#!/bin/bash
# second lease: the rewritten 8-bit CUDA block code (lane-contiguous vector accesses)
export PATH=/usr/local/cuda/bin:$PATH PY=python3 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
O=$1
tools/gpu_session.sh $O build > /dev/null; tail -3 $O/build.log
timeout 80 python3 -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_cuda_lowmem.py tests/test_triton_cuda.py -k "8bit or q8 or quant or kahan" > $O/q8tests.log 2>&1; tail -2 $O/q8tests.log
timeout 70 python3 tools/bench_step.py --device cuda --models gpt2-2048 --no-memory --max-seconds 1 --variants ours-fused-8bit,ours-fused-triton-8bit,ours-fused-bf16,adamw-fused --output $O/bench_q8.md --chart /tmp/c.png > $O/q8bench.log 2>&1; grep "gpt2-2048 \|floor" $O/q8bench.log
TRAIN_RUNS="cuda:--amp --amp-dtype bfloat16 --opt-kwargs state_dtype=8bit" tools/gpu_session.sh $O train | tail -3; grep -i "final top-1\|^exit\|Error" $O/train.log | tail -4
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
timeout 60 $ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats -k regex:adan -c 2 python3 tools/profile_kernels.py > $O/profile.log 2>&1; grep "Duration\|DRAM Throughput\|Registers Per\|Achieved Occ" $O/profile.log
tools/gpu_session.sh $O sanitizers | tail -4
