#!/usr/bin/env bash
# GPU checks of the fused CUDA kernels (issue 3), for a machine with an NVIDIA GPU:
#   1. the CUDA test suite (tests marked `cuda`: equivalence with the float64
#      reference, dtypes, > 2^31-element tensor, CUDA-graph capture/replay,
#      no host sync under GradScaler + clipping, no parameter-sized temporaries);
#      8-bit states and Kahan buffers on the CUDA kernel (tests/test_cuda_lowmem.py);
#      the Triton kernels compiled for the GPU (tests/test_triton_cuda.py, TRITON_INTERPRET=0);
#      FSDP2 + clipping without host sync (tests/test_distributed.py, one GPU);
#   2. compute-sanitizer memcheck on a short run of the kernels (several dtypes,
#      unaligned views, many tensors across launches, AMP skip, 8-bit states,
#      Kahan buffers, the Triton kernels), and the same run under synccheck
#      (the 8-bit CUDA path's warps exchange block maxima by shuffles).
# Every section runs even when an earlier one failed; the summary at the end
# names each section's result and the exit status is non-zero if any failed
# (a sanitizer that refuses the device is reported as such, not as a pass).
# Usage (repository root): tools/gpu_checks.sh [logfile]   (default gpu_checks.log)
# GPU_CHECKS=tests or GPU_CHECKS=sanitizers runs one section alone (default: both), so that a short
# lease can run other work between them.
# PY picks the interpreter (default .venv/bin/python); on a bare GPU machine with
# torch, pytest, ninja and nvcc preinstalled: PY=python3 tools/gpu_checks.sh LOG.
# Rebuilds the extension first when it lacks CUDA kernels, for the visible GPU's
# architecture.  Record the log (device, date, versions are at its top).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SECTIONS=${GPU_CHECKS:-tests sanitizers}
LOG=${1:-gpu_checks.log}
exec > >(tee "$LOG") 2>&1
export TRITON_INTERPRET=0   # compile the Triton kernels for the GPU (tests/conftest.py defaults to the interpreter)
declare -A RESULT
FAILED=0
record() {  # record NAME STATUS
    RESULT[$1]=$2
    [ "$2" = passed ] || FAILED=1
}
record_sanitizer() {  # record_sanitizer TOOL EXIT_STATUS: judges /tmp/adan_TOOL.log
    local log=/tmp/adan_$1.log
    if grep -q "Device not supported\|error 999" "$log" && ! grep -q "sanitized run finished" "$log"; then
        record "$1" "not run (compute-sanitizer refused the device)"
    elif [ "$2" -eq 0 ] && grep -q "ERROR SUMMARY: 0 errors" "$log"; then
        record "$1" passed
    else
        record "$1" "failed (exit $2)"
    fi
}

echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if ! "$PY" -c "import sys, torch; from adan_plugin import _ext; sys.exit(0 if _ext.fused_supported(torch.device('cuda')) else 1)"; then
    echo "== building adan_plugin._C with CUDA kernels for this GPU"
    cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    TORCH_CUDA_ARCH_LIST="$cap" FORCE_CUDA=1 "$PY" setup.py build_ext --inplace -q || exit 1
fi

if [[ " $SECTIONS " == *" tests "* ]]; then
echo "== CUDA test suite"
if "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_cuda_fused.py tests/test_cuda_lowmem.py \
        tests/test_triton_cuda.py tests/test_distributed.py; then
    record tests passed
else
    record tests failed
fi
fi

if [[ " $SECTIONS " == *" sanitizers "* ]]; then
echo "== compute-sanitizer memcheck and synccheck, short run"
SANITIZER=$(command -v compute-sanitizer || true)
for dir in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -z "$SANITIZER" ] && [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ]; then
        SANITIZER="$dir/bin/compute-sanitizer"
    fi
done
[ -n "$SANITIZER" ] || echo "compute-sanitizer not found (install the CUDA toolkit's sanitizer)"
cat > /tmp/adan_sanitized_run.py <<'EOF'
import torch
from adan_plugin import Adan
from adan_plugin.fused import _fused_adan

torch.manual_seed(0)
kw = dict(step=2, lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.05,
          no_prox=False, caution=False)
# Every dtype pair, sizes around the vector width and the chunk size, and
# unaligned views (scalar path) next to aligned tensors (vector path).
for p_dtype in (torch.float32, torch.bfloat16, torch.float16):
    for s_dtype in (torch.float32, torch.bfloat16):
        sizes = [0, 1, 3, 4, 5, 65535, 65536, 65537, 300001]
        lists = [[torch.randn(n + 1, device="cuda", dtype=p_dtype if k < 2 else s_dtype)[1:] if n % 2
                  else torch.randn(n, device="cuda", dtype=p_dtype if k < 2 else s_dtype) for n in sizes]
                 for k in range(6)]
        for t in lists[3]:
            t.abs_()
        _fused_adan(*lists, **kw)
# Many tensors across several launches, clipping, AMP scale and a skipped step.
params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in [7, 4099, 1] * 50 + [65536 * 330 + 3]]
opt = Adan(params, fused=True, max_grad_norm=1.0)
for it in range(3):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.grad_scale = torch.full((), 8.0, device="cuda")
    opt.found_inf = torch.full((), float(it == 1), device="cuda")
    opt.step()
# 8-bit states with Kahan buffers (bf16 parameters), then the same on the Triton kernels: a tensor of a
# partial last quantization block, one under 4096 elements (fp32 states), one spanning chunks.
for backend in ("cuda", "triton"):
    ps = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16)) for n in (4100, 77, 65536 * 2 + 999)]
    opt = Adan(ps, fused=True, fused_backend=backend, state_dtype="8bit", kahan_sum=True, max_grad_norm=1.0)
    for it in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    fp = [torch.nn.Parameter(torch.randn(n + 1, device="cuda")[1:]) for n in (3, 4099, 65537)]  # unaligned views
    opt = Adan(fp, fused=True, fused_backend=backend, state_dtype=torch.bfloat16)
    for p in fp:
        p.grad = torch.randn_like(p)
    opt.step()
torch.cuda.synchronize()
print("sanitized run finished")
EOF
# memcheck: out-of-bounds and misaligned accesses; synccheck: the 8-bit CUDA path's warp shuffles.
for tool in memcheck synccheck; do
    if [ -z "$SANITIZER" ]; then
        record $tool "not run (compute-sanitizer not found)"
        continue
    fi
    echo "-- $tool"
    extra=()
    [ $tool = memcheck ] && extra=(--leak-check no)
    "$SANITIZER" --tool $tool --error-exitcode 1 "${extra[@]}" "$PY" /tmp/adan_sanitized_run.py 2>&1 \
        | tee /tmp/adan_$tool.log
    record_sanitizer $tool "${PIPESTATUS[0]}"
done
fi

echo "== summary"
for name in tests memcheck synccheck; do
    [ -n "${RESULT[$name]:-}" ] && echo "$name: ${RESULT[$name]}"
done
if [ "$FAILED" -eq 0 ]; then
    echo "== every GPU check that ran passed ($SECTIONS)"
else
    echo "== some GPU checks did not pass"
fi
exit "$FAILED"
