import os
import sys

# Triton's interpreter runs the Triton kernels on CPU tensors (tests/triton_interp.py).  Triton decides
# when triton.language is imported, and test modules import it indirectly at collection (timm, mmcv), so
# it is set here, before any of them: triton.language imported without it has compiled-only helpers
# (tl.max, ...) that refuse to run inside an interpreted kernel.  TRITON_INTERPRET=0 in the
# environment keeps triton compiling for a GPU (the tests that need the interpreter then fail, saying so).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "zoo")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _use_kernel(name, monkeypatch):
    ops = torch.ops.adan_plugin
    if name == "cuda_kernel_code":
        monkeypatch.setattr(ops, "fused_adan_", ops._fused_adan_cuda_code_on_cpu_)
    elif name == "triton_kernel":
        from triton_interp import one_tile_per_chunk, triton_adan
        if triton_adan is None:
            pytest.skip("triton is not importable")
        one_tile_per_chunk(monkeypatch)
        monkeypatch.setattr(ops, "fused_adan_", ops.fused_adan_triton_)
    return name


# Tests of the fused op that take this fixture run once per kernel: the CPU kernel, and the CUDA
# kernel's block code run on CPU tensors (csrc/adan_cuda_on_cpu.cpp), so the CUDA math is tested here.
@pytest.fixture(params=["cpu_kernel", "cuda_kernel_code"])
def kernel(request, monkeypatch):
    return _use_kernel(request.param, monkeypatch)


# The same, and the Triton kernel run by Triton's interpreter (modules using it import triton_interp at
# collection, see there), for tests cheap enough under the interpreter.
@pytest.fixture(params=["cpu_kernel", "cuda_kernel_code", "triton_kernel"])
def kernel_or_triton(request, monkeypatch):
    return _use_kernel(request.param, monkeypatch)
