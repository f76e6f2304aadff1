"""The fused step re-checks, at every step, what can change between steps.

``Adan.step()`` keeps its per-parameter work small (the backend is asked once per device, layout copies
only where strides differ; see adan_plugin/adan.py and fused.py), but nothing it verified at one step is
trusted at the next: a parameter whose dtype, density, device or layout changed since, a gradient in
another layout, a parameter added to a group behind the optimizer's back, are all seen.  A refused
step changes nothing."""
import pytest
import torch

from adan_plugin import Adan, _ext
from adan_plugin.functional import STATE_KEYS
from contract_helpers import assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")

REFUSAL = "`fused=True` requires all the params"


def _trained(**kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (6,), (2, 3, 2, 2)]]
    opt = Adan(params, lr=1e-2, fused=True, **kw)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params


@pytest.mark.parametrize("change, match", [
    # p.data = ... keeps the Parameter object (its id, its state) and changes what it holds.
    (lambda p: torch.randn(p.shape, dtype=torch.float64), "a parameter has dtype torch.float64"),
    (lambda p: torch.randn(2 * p.numel())[::2].view(p.shape), "non-dense view"),
])
@pytest.mark.parametrize("which", [1, 2])
def test_a_parameter_changed_since_the_last_step_is_refused_before_any_write(change, match, which):
    opt, params = _trained()
    p = params[which]
    p.data = change(p)
    p.grad = torch.ones_like(p)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=REFUSAL) as err:
        opt.step()
    assert match in str(err.value)
    assert_unchanged(before, snapshot(opt))


def test_every_device_of_a_group_is_asked_for_its_backend():
    # The CPU parameters come first and have a backend; the meta one (accepted when built) has none.
    cpu = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = Adan(cpu + [meta], lr=1e-2, fused=True)
    for p in cpu + [meta]:
        p.grad = torch.ones_like(p)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=REFUSAL) as err:
        opt.step()
    assert "no fused backend for parameters on meta" in str(err.value)
    assert_unchanged(before, snapshot(opt))


def test_a_parameter_appended_to_a_group_is_checked_at_the_next_step():
    opt, params = _trained()
    extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    extra.grad = torch.randn(3, dtype=torch.float64)
    opt.param_groups[0]["params"].append(extra)  # not through add_param_group: only step() sees it
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="a parameter has dtype torch.float64"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


def test_add_param_group_checks_the_new_group_and_step_checks_it_again():
    opt, params = _trained()
    with pytest.raises(RuntimeError, match="a parameter has dtype torch.float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]})
    assert len(opt.param_groups) == 1
    # Meta parameters are accepted when added (built on meta, materialised later) and refused at a step.
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt.add_param_group({"params": [meta]})
    meta.grad = torch.empty_like(meta)
    for p in params:
        p.grad = torch.ones_like(p)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="no fused backend for parameters on meta"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


def _run(dtype, kw, change_at=None, grad_view_at=None, steps=4):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5, generator=gen).to(dtype))
    opt = Adan([p], lr=1e-2, weight_decay=0.02, fused=True, **kw)
    for i in range(steps):
        if i == change_at:  # model.to(memory_format=torch.channels_last) in the middle of training
            p.data = p.data.to(memory_format=torch.channels_last)
        g = torch.randn(2, 3, 4, 5, generator=gen).to(dtype)
        if i == grad_view_at:  # same values, as a non-dense view
            g = torch.stack([g, torch.zeros_like(g)], dim=-1)[..., 0]
        p.grad = g
        opt.step()
    return p, opt


@pytest.mark.parametrize("dtype, kw", [
    (torch.float32, {}),
    (torch.float32, dict(state_dtype=torch.bfloat16)),
    (torch.bfloat16, dict(kahan_sum=True)),
])
def test_a_layout_change_between_steps_relays_states_and_steps_the_same(dtype, kw):
    want, _ = _run(dtype, kw)
    p, opt = _run(dtype, kw, change_at=2)
    assert p.stride() != want.stride()
    st = opt.state[p]
    keys = STATE_KEYS + (("kahan_comp",) if kw.get("kahan_sum") else ())
    assert all(st[k].stride() == p.stride() for k in keys), {k: st[k].stride() for k in keys}
    assert torch.equal(p.detach(), want.detach())  # elementwise math: the layout changes no bit


def test_a_gradient_in_another_layout_for_one_step_steps_the_same():
    want, _ = _run(torch.float32, {})
    p, _ = _run(torch.float32, {}, grad_view_at=1)
    assert torch.equal(p.detach(), want.detach())
