"""The optimizer contract: everything is checked before anything changes, and what ``param_groups``
says is what ``step()`` does (issue 10, items 2-8).  Each test names the class of problem it guards."""
import copy
import math

import pytest
import torch

from adan_plugin import Adan, _ext
from adan_plugin.functional import STATE_KEYS, _single_tensor_adan
from contract_helpers import PATHS, assert_unchanged, snapshot, trained
from reference import RefAdan

FUSED = pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")


def _load_refused(sd, needle, **kw):
    """Loading ``sd`` into a differently trained optimizer raises ValueError naming ``needle`` and changes nothing."""
    target, _ = trained(steps=5, seed=1, **kw)
    before = snapshot(target)
    with pytest.raises(ValueError) as err:
        target.load_state_dict(sd)
    assert needle in str(err.value), str(err.value)
    assert_unchanged(before, snapshot(target))
    return target


# ------------------------------------------------------------------ item 2: incomplete/corrupt checkpoints
@pytest.mark.parametrize("key", ["betas", "lr", "eps", "weight_decay"])
def test_group_without_a_hyperparameter_is_refused(key):
    sd = copy.deepcopy(trained()[0].state_dict())
    del sd["param_groups"][1][key]
    _load_refused(sd, repr(key))


@pytest.mark.parametrize("corrupt,needle", [
    (lambda st: st.update(exp_avg=torch.zeros(4, 3, dtype=torch.int64)), "dtype torch.int64"),
    (lambda st: st.update(exp_avg_sq=torch.zeros(4, 3, device="meta")), "meta"),
    (lambda st: st.update(exp_avg_diff=[0.0] * 12), "must be a tensor"),
    (lambda st: st.update(neg_pre_grad=torch.zeros(4, 3, dtype=torch.complex64)), "complex"),
    (lambda st: st.update(momentum_buffer=torch.zeros(4, 3)), "momentum_buffer"),
    (lambda st: st.update(step=torch.tensor([1.0, 2.0])), "['step']"),
    (lambda st: st.update(step=-3), "['step']"),
])
def test_bad_state_entry_is_refused(corrupt, needle):
    sd = copy.deepcopy(trained()[0].state_dict())
    corrupt(sd["state"][0])
    _load_refused(sd, needle)


@pytest.mark.parametrize("step", [-1, 2.5, "3", True, None, float("nan"), torch.tensor(float("inf")),
                                  torch.tensor([1.0, 2.0]), torch.tensor(3.0, device="meta")])
def test_bad_group_step_is_refused(step):
    sd = copy.deepcopy(trained()[0].state_dict())
    sd["param_groups"][0]["step"] = step
    _load_refused(sd, "['step']")


def test_state_without_a_step_count_is_refused():
    sd = copy.deepcopy(trained()[0].state_dict())
    del sd["param_groups"][0]["step"]
    _load_refused(sd, "no 'step' count")


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=0.1),
    lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.9, 0.99)),
])
@pytest.mark.parametrize("stepped", [False, True])
def test_another_optimizers_checkpoint_is_refused(make, stepped):
    _, params = trained(steps=0)
    other = make([{"params": params[:2]}, {"params": params[2:]}])
    if stepped:
        for p in params:
            p.grad = torch.randn_like(p)
        other.step()
    _load_refused(copy.deepcopy(other.state_dict()), "Adan.load_state_dict")


def test_fp16_states_of_a_checkpoint_load_as_fp32():
    opt, params = trained()
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        for k in STATE_KEYS:
            st[k] = st[k].half()
    half = [torch.nn.Parameter(p.detach().half()) for p in params]
    for ps in (params, half):
        target = Adan([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, fused=False)
        target.load_state_dict(sd)
        assert all(st[k].dtype == torch.float32 for st in target.state.values() for k in STATE_KEYS)


def test_states_take_the_parameters_layout_on_load():
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    opt = Adan([p], lr=1e-2, fused=False)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for k in STATE_KEYS:
        sd["state"][0][k] = sd["state"][0][k].contiguous()
    opt.load_state_dict(sd)
    assert all(opt.state[p][k].stride() == p.stride() for k in STATE_KEYS)


# ------------------------------------------------------------------ item 3: what param_groups says is what step does
@pytest.mark.parametrize("path", PATHS)
def test_loaded_max_grad_norm_is_the_one_that_clips(path):
    source, params = trained(steps=3, max_grad_norm=0.1, **PATHS[path])
    sd = copy.deepcopy(source.state_dict())
    start = [p.detach().clone() for p in params]
    twins = []
    for kw in (dict(max_grad_norm=0.0), dict(max_grad_norm=0.1)):  # loaded into a non-clipping one / reference
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = Adan([{"params": ps[:2]}, {"params": ps[2:], "lr": 2e-3}], lr=1e-2, weight_decay=0.02,
                   **kw, **PATHS[path])
        opt.load_state_dict(copy.deepcopy(sd))
        assert all(g["max_grad_norm"] == 0.1 for g in opt.param_groups)
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            for p in ps:
                p.grad = 10 * torch.randn(p.shape, generator=gen)
            opt.step()
        twins.append(ps)
    for a, b in zip(*twins):
        assert torch.equal(a, b)


def test_a_group_added_after_loading_inherits_the_loaded_optimizer_wide_options():
    source, _ = trained(max_grad_norm=0.1)
    target, _ = trained(seed=1)
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    target.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    assert target.param_groups[-1]["max_grad_norm"] == 0.1


def test_groups_disagreeing_on_an_optimizer_wide_option_are_refused():
    sd = copy.deepcopy(trained()[0].state_dict())
    sd["param_groups"][1]["max_grad_norm"] = 1.0
    _load_refused(sd, "max_grad_norm")


@FUSED
def test_an_option_the_optimizer_cannot_honour_is_refused_at_load():
    sd = copy.deepcopy(trained(fused=False)[0].state_dict())
    for g in sd["param_groups"]:
        g["caution"] = True
    _load_refused(sd, "caution", fused=True)
    sd = copy.deepcopy(trained(fused=True, skip_nonfinite=True)[0].state_dict())
    _load_refused(sd, "skip_nonfinite", fused=False)


def test_execution_choices_stay_the_constructors():
    sd = copy.deepcopy(trained(fused=False, foreach=True)[0].state_dict())
    target, _ = trained(seed=1, fused=False, foreach=False)
    target.load_state_dict(sd)
    assert all(g["foreach"] is False and g["fused"] is False for g in target.param_groups)


# ------------------------------------------------------------------ items 4, 5: 16-bit parameters and states
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_parameters_get_fp32_math_on_every_path(path, dtype):
    init = torch.randn(64, dtype=torch.float64)
    grad = torch.randn(64, dtype=torch.float64)
    grad[::3] = 0.0  # eps=1e-8 underflows to 0 in fp16: 0/0 without fp32 math
    p = torch.nn.Parameter(init.to(dtype))
    opt = Adan([p], lr=1e-2, **PATHS[path])
    ref = RefAdan([dict(params=[init.to(dtype).double()], lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8,
                        weight_decay=0.0, no_prox=False, caution=False)])
    for _ in range(3):
        p.grad = grad.to(dtype)
        opt.step()
        ref.step([[grad.to(dtype).double()]])
    assert torch.isfinite(p).all()
    # Only the storage rounds: within about one ulp of the dtype (values are O(1)).
    tol = dict(rtol=0, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(p.detach().double(), ref.params()[0][0], **tol)


def test_fp16_states_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="bfloat16") as err:
        Adan([torch.nn.Parameter(torch.randn(3))], state_dtype=torch.float16)
    assert "overflow" in str(err.value)


@pytest.mark.parametrize("path", PATHS)
def test_fp16_parameters_keep_fp32_states_and_survive_large_gradients(path):
    p = torch.nn.Parameter(torch.randn(16).half())
    opt = Adan([p], lr=1e-3, **PATHS[path])
    before = p.detach().clone()
    for _ in range(3):
        p.grad = torch.full_like(p, 1e4)  # squares to 1e8: inf in fp16
        opt.step()
    assert all(opt.state[p][k].dtype == torch.float32 for k in STATE_KEYS)
    assert torch.isfinite(opt.state[p]["exp_avg_sq"]).all()
    assert (p.detach() < before).all()  # still updating, downhill


# ------------------------------------------------------------------ item 6: any gradient layout, no half steps
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("flip", ["grad", "param"])
def test_any_gradient_layout_steps_like_the_same_gradient_contiguous(path, flip):
    def run(layout):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(3, 4))
        w = torch.randn(2, 3, 4, 5)
        b = torch.nn.Parameter(w.to(memory_format=torch.channels_last) if flip == "param" else w)
        opt = Adan([{"params": [a]}, {"params": [b]}], lr=1e-2, max_grad_norm=1.0, **PATHS[path])
        for _ in range(3):
            a.grad = torch.randn(3, 4)
            g = torch.randn(2, 3, 4, 5)
            b.grad = g.to(memory_format=layout).clone() if flip == "grad" else g.contiguous()
            opt.step()
        return a.detach(), b.detach()

    # The global clip norm sums the gradient in its memory order: rounding-level differences only.
    for x, y in zip(run(torch.contiguous_format), run(torch.channels_last)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
def test_a_refused_step_changes_nothing_in_any_group(path):
    lr = torch.tensor(1e-2)
    opt, params = trained(**PATHS[path])
    opt.param_groups[1]["lr"] = lr
    for p in params:
        p.grad = torch.randn_like(p)
    lr.fill_(float("nan"))  # what a scheduler's in-place update could leave behind
    before = snapshot(opt)
    with pytest.raises(ValueError, match="lr is a tensor that now holds nan"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


# ------------------------------------------------------------------ item 7: hyper-parameter types and values
@pytest.mark.parametrize("kwargs,needle", [
    (dict(lr=torch.tensor(float("nan"))), "lr=nan"),
    (dict(lr=torch.tensor(-1e-3)), "lr=-0.001"),
    (dict(weight_decay=torch.tensor(-0.1)), "weight_decay"),
    (dict(eps=torch.tensor(float("inf"))), "eps=inf"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    (dict(lr=True), "lr must be a real number"),
    (dict(lr="0.1"), "lr must be a real number"),
    (dict(no_prox="false"), "no_prox must be True or False"),
    (dict(caution=1), "caution must be True or False"),
    (dict(foreach="yes"), "foreach must be None, True or False"),
    (dict(betas=(0.9, False, 0.9)), "betas[1]"),
])
def test_invalid_options_are_refused(kwargs, needle):
    with pytest.raises(ValueError) as err:
        Adan([torch.nn.Parameter(torch.randn(2))], **kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize("group", [dict(fused=True, foreach=True), dict(no_prox="no"), dict(lr=torch.tensor(-1.0))])
def test_add_param_group_refuses_and_adds_nothing(group):
    opt, _ = trained()
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], **group})
    assert len(opt.param_groups) == 2
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lr", [torch.tensor(1e-2), torch.tensor([1e-2]), torch.tensor([[1e-2]])],
                         ids=["0d", "1", "1x1"])
def test_one_element_tensor_hyperparameters_step_like_floats(path, lr):
    runs = []
    for value in (1e-2, lr):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
        as_tensor = torch.is_tensor(value)
        opt = Adan([p], lr=value, weight_decay=torch.tensor(0.25) if as_tensor else 0.25,
                   eps=torch.tensor([2.0 ** -20]) if as_tensor else 2.0 ** -20, max_grad_norm=1.0, **PATHS[path])
        for _ in range(3):
            p.grad = torch.randn(5, 3, generator=gen)
            opt.step()
        runs.append(p.detach())
    assert torch.equal(*runs)


# ------------------------------------------------------------------ item 8: as torch.optim optimizers behave
@pytest.mark.parametrize("kwargs", [dict(), dict(max_grad_norm=0.5), dict(fused=False, foreach=True, max_grad_norm=0.5),
                                    dict(fused=False, foreach=False, max_grad_norm=0.5)])
def test_float64_parameters_with_any_unfused_option_track_the_reference(kwargs):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(4, 3), (7,)]]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = Adan(params, lr=1e-2, **kwargs)
    ref = RefAdan([dict(params=[t.clone() for t in init], lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8,
                        weight_decay=0.0, no_prox=False, caution=False)],
                  max_grad_norm=kwargs.get("max_grad_norm", 0.0))
    for _ in range(4):
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in init]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step([grads])
    for p, r in zip(params, ref.params()[0]):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)


@FUSED
def test_explicit_foreach_false_is_the_single_tensor_path(monkeypatch):
    calls = []
    import adan_plugin.adan as adan_mod

    def spy(*args, **kwargs):
        calls.append(1)
        return _single_tensor_adan(*args, **kwargs)

    monkeypatch.setattr(adan_mod, "_single_tensor_adan", spy)
    p = torch.nn.Parameter(torch.randn(3))
    opt = Adan([p], foreach=False)
    assert not opt._step_supports_amp_scaling
    p.grad = torch.randn(3)
    opt.step()
    assert calls == [1]


@FUSED
def test_fused_true_builds_on_meta_and_refuses_to_step_there():
    model = torch.nn.Linear(3, 2, device="meta")
    opt = Adan(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


def test_complex_parameters_step_like_their_real_view():
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64, generator=gen))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    oz, orr = Adan([z], lr=1e-2, max_grad_norm=1.0), Adan([r], lr=1e-2, max_grad_norm=1.0)
    for _ in range(3):
        g = torch.randn(4, dtype=torch.complex64, generator=gen)
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        oz.step()
        orr.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert math.isfinite(float(z.detach().abs().sum()))
