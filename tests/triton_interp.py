"""Triton's interpreter for the tests: adan_plugin.triton_adan (``triton_adan``; None where triton is not
importable) with its kernels run on CPU tensors.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when triton.language (whose helpers such as
tl.max are kernels too) and adan_plugin.triton_adan are imported; tests/conftest.py sets it before any test
module is collected (timm and mmcv import triton), and it stays set (triton's lazily imported modules
check that it has not changed).  CPU code never runs Triton otherwise: fused=None on CPU tensors never
picks the Triton kernels, and torch.compile's CPU backend generates C++."""
import pytest
import torch

try:
    from adan_plugin import triton_adan
except ImportError:
    triton_adan = None

if triton_adan is not None:
    ok, why = triton_adan.supports(torch.device("cpu"))
    if not ok:
        pytest.fail(f"the Triton kernels cannot run in the interpreter here: {why}", pytrace=False)


def one_tile_per_chunk(monkeypatch) -> None:
    """The interpreter's cost is per operation, not per element: with one tile per chunk (BLOCK = CHUNK)
    a step runs ~16x fewer operations.  The tile loop at the default BLOCK (full tiles, the masked tail)
    is covered by tests/test_triton.py's op tests."""
    monkeypatch.setattr(triton_adan, "BLOCK", triton_adan.CHUNK)
