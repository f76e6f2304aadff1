import os
import sys

import pytest
import torch

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


# Tests of the fused op that take this fixture run once per kernel: the CPU kernel, and the CUDA
# kernel's block code run on CPU tensors (csrc/adan_cuda_on_cpu.cpp), so the CUDA math is tested here.
@pytest.fixture(params=["cpu_kernel", "cuda_kernel_code"])
def kernel(request, monkeypatch):
    if request.param == "cuda_kernel_code":
        ops = torch.ops.adan_plugin
        monkeypatch.setattr(ops, "fused_adan_", ops._fused_adan_cuda_code_on_cpu_)
    return request.param
