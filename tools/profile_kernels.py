"""Run each fused backend and state dtype for two steps on one 16M-element tensor (one launch each), for
a kernel profiler to attach to, e.g. on a GPU machine:

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis -k regex:adan python3 tools/profile_kernels.py

Kernels run in the order printed (two launches per configuration)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adan_plugin import Adan  # noqa: E402

CONFIGS = [("cuda", "8bit"), ("cuda", torch.bfloat16), ("cuda", None), ("triton", "8bit"), ("triton", torch.bfloat16)]


def main():
    n = 16 * 2 ** 20
    for backend, state in CONFIGS:
        p = torch.nn.Parameter(torch.randn(n, device="cuda"))
        p.grad = torch.randn_like(p)
        opt = Adan([p], fused=True, fused_backend=backend, state_dtype=state)
        for _ in range(2):
            opt.step()
        torch.cuda.synchronize()
        print(f"profiled: backend {backend}, state {state}: {opt.fused_backends}", flush=True)


if __name__ == "__main__":
    main()
