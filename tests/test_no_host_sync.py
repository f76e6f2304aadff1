"""No host-device sync inside ``step()``, checked on the CPU.

A sync is the host waiting for a tensor's value: ``.item()``, ``float(t)``, ``if t:``, ``torch.equal``
reach the dispatcher as ``aten._local_scalar_dense`` / ``is_nonzero`` / ``equal``, and ops whose output
size depends on the data (``nonzero``, ``masked_select``) must read it too.  Running ``step()`` under a
dispatch mode that refuses those ops catches such reads on every path and option without a GPU.  It cannot
see a device-to-host copy (``.cpu()`` is an ordinary copy on a CPU), boolean-mask indexing (on a CPU its
``nonzero`` runs inside ``index``), nor what the CPU kernel does in C++; tests/test_cuda_fused.py checks on
a GPU with ``set_sync_debug_mode('error')``."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adan_plugin import Adan, _ext

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.equal.default, torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}


class RefuseHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"host read of a tensor value inside step(): {func}")
        return func(*args, **(kwargs or {}))


def _params(dtype=torch.float32):
    # (64, 80): over 4096 elements, so state_dtype="8bit" quantizes it
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in [(3, 4), (5,), (), (64, 80)]]


FUSED = pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")
CONFIGS = [
    pytest.param(dict(fused=False, foreach=False), id="single"),
    pytest.param(dict(fused=False, foreach=True), id="foreach"),
    pytest.param(dict(fused=False, foreach=False, max_grad_norm=0.5), id="single-clip"),
    pytest.param(dict(fused=False, foreach=True, max_grad_norm=0.5), id="foreach-clip"),
    pytest.param(dict(fused=False, foreach=True, caution=True, no_prox=True), id="foreach-caution"),
    pytest.param(dict(fused=False, foreach=False, caution=True), id="single-caution"),
    pytest.param(dict(fused=True), id="fused", marks=FUSED),
    pytest.param(dict(fused=True, max_grad_norm=0.5), id="fused-clip", marks=FUSED),
    pytest.param(dict(fused=True, max_grad_norm=0.5, skip_nonfinite=True), id="fused-skip-nonfinite",
                 marks=FUSED),
    pytest.param(dict(fused=True, capturable=True), id="fused-capturable", marks=FUSED),
    pytest.param(dict(fused=True, state_dtype=torch.bfloat16), id="fused-bf16-state", marks=FUSED),
    pytest.param(dict(fused=True, state_dtype="8bit"), id="fused-8bit-state", marks=FUSED),
    pytest.param(dict(fused=True, state_dtype="8bit", capturable=True, kahan_sum=True, dtype=torch.bfloat16),
                 id="fused-8bit-kahan-capturable", marks=FUSED),
    pytest.param(dict(fused=False, foreach=False, kahan_sum=True, dtype=torch.bfloat16), id="single-kahan"),
    pytest.param(dict(fused=False, foreach=True, kahan_sum=True, dtype=torch.bfloat16), id="foreach-kahan"),
    pytest.param(dict(fused=True, kahan_sum=True, dtype=torch.bfloat16), id="fused-kahan", marks=FUSED),
]


@pytest.mark.parametrize("read", [lambda t: float(t.sum()), lambda t: bool(t.any()), lambda t: t.nonzero(),
                                  lambda t: t.masked_select(t > 0)])
def test_the_probe_sees_a_host_read(read):
    with pytest.raises(AssertionError, match="host read"):
        with RefuseHostReads():
            read(torch.randn(8))


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_step_reads_no_tensor_value_on_the_host(kwargs):
    kwargs = dict(kwargs)
    params = _params(kwargs.pop("dtype", torch.float32))
    opt = Adan(params, lr=1e-2, weight_decay=0.02, **kwargs)
    for step in range(3):  # the first step seeds state, later ones take the steady path
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 2 and kwargs.get("skip_nonfinite"):
            params[0].grad[0, 0] = float("nan")
        with RefuseHostReads():
            opt.step()


@FUSED
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_grad_scaler_step_reads_no_tensor_value_on_the_host(max_grad_norm):
    # The fused optimizer takes GradScaler's scale and found_inf as tensors, so scaler.step() as a whole
    # (not only our step) stays on the device; one step overflows.
    params = _params()
    opt = Adan(params, lr=1e-2, fused=True, max_grad_norm=max_grad_norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(sum((p ** 2).sum() for p in params)).backward()
        if step == 1:
            params[1].grad[0] = float("inf")
        with RefuseHostReads():
            scaler.step(opt)
        scaler.update()
