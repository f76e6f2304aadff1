"""Triton's interpreter for the tests: importing this module sets TRITON_INTERPRET=1 and imports
adan_plugin.triton_adan (``triton_adan``; None where triton is not importable), so the Triton kernels run
on CPU tensors.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when triton and adan_plugin.triton_adan are
imported: test modules that run the Triton kernels import this module at collection, before any test
imports them, and the variable stays set (triton's lazily imported modules check that it has not changed).
CPU code never runs Triton otherwise: fused=None on CPU tensors never picks the Triton kernels, and
torch.compile's CPU backend generates C++."""
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
try:
    from adan_plugin import triton_adan
except ImportError:
    triton_adan = None

if triton_adan is not None and not triton_adan.interpreted():
    pytest.fail("adan_plugin.triton_adan was imported before TRITON_INTERPRET=1 was set", pytrace=False)


def one_tile_per_chunk(monkeypatch) -> None:
    """The interpreter's cost is per operation, not per element: with one tile per chunk (BLOCK = CHUNK)
    a step runs ~16x fewer operations.  The tile loop at the default BLOCK (full tiles, the masked tail)
    is covered by tests/test_triton.py's op tests."""
    monkeypatch.setattr(triton_adan, "BLOCK", triton_adan.CHUNK)
