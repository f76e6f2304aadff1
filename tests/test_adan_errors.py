"""Bad input raises an error that names the problem, and changes nothing."""
import math
import warnings

import pytest
import torch

from adan_plugin import Adan
from test_adan_behaviour import _assert_same, _snapshot


def _trained(steps=3, **kw):
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(5))
    opt = Adan([{"params": [a]}, {"params": [b], "lr": 2e-3}], lr=1e-2, weight_decay=0.02, **kw)
    for _ in range(steps):
        a.grad, b.grad = torch.randn(4, 3), torch.randn(5)
        opt.step()
    return opt, [a, b]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(lr=-1e-3), "lr=-0.001"),
    (dict(lr=math.nan), "lr=nan"),
    (dict(eps=-1.0), "eps=-1.0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(max_grad_norm=-5.0), "max_grad_norm=-5.0"),
    (dict(betas=(1.0, 0.92, 0.99)), "betas[0]=1.0"),
    (dict(betas=(0.98, -0.1, 0.99)), "betas[1]=-0.1"),
    (dict(betas=(0.98, 0.92, 1.5)), "betas[2]=1.5"),
    (dict(betas=(0.98, 0.92)), "three"),
    (dict(foreach=True, fused=True), "mutually exclusive"),
])
def test_invalid_hyperparameters(kwargs, needle):
    with pytest.raises(ValueError, match=None) as err:
        Adan([torch.nn.Parameter(torch.randn(2))], **kwargs)
    assert needle in str(err.value)


def test_invalid_group_is_rejected_and_not_added():
    opt, params = _trained()
    before = _snapshot(opt, [{"params": params}])
    with pytest.raises(ValueError, match="weight_decay=-1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "weight_decay": -1})
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "max_grad_norm": 1.0})
    assert len(opt.param_groups) == 2
    _assert_same(before, _snapshot(opt, [{"params": params}]))


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True)])
def test_sparse_gradient_fails_before_any_change(path):
    dense = torch.nn.Parameter(torch.randn(3))
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Adan([dense, emb.weight], lr=1e-2, max_grad_norm=1.0, fused=False, **path)
    dense.grad = torch.randn(3)
    opt.step()
    before = _snapshot(opt, [{"params": [dense, emb.weight]}])
    dense.grad = torch.randn(3)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    _assert_same(before, _snapshot(opt, [{"params": [dense, emb.weight]}]))


def test_fused_without_support_says_why():
    from adan_plugin import _ext
    # Built: the dtype is what is unsupported.  Not built: how to build it.
    needle = "float64" if _ext.extension_loaded() else "pip install --no-build-isolation -e ."
    with pytest.raises(RuntimeError) as err:
        Adan([torch.nn.Parameter(torch.empty(3, dtype=torch.float64))], fused=True)
    assert needle in str(err.value)


def _tamper(sd, fn):
    sd = {"state": {k: dict(v) for k, v in sd["state"].items()},
          "param_groups": [dict(g) for g in sd["param_groups"]]}
    fn(sd)
    return sd


@pytest.mark.parametrize("tamper,needle", [
    (lambda sd: sd["state"][0].pop("exp_avg_sq"), "truncated"),
    (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(7)), "shape"),
    (lambda sd: sd["param_groups"].pop(), "parameter groups"),
    (lambda sd: sd["param_groups"][0].update(params=[]), "parameters in the checkpoint"),
    (lambda sd: sd["param_groups"][1].update(lr=-1.0), "lr=-1.0"),
    (lambda sd: sd["state"].update({7: {}}), "no parameter group lists"),
    (lambda sd: sd.pop("state"), "'state' and 'param_groups'"),
])
def test_bad_checkpoint_is_rejected_and_changes_nothing(tamper, needle):
    opt, params = _trained()
    good = opt.state_dict()
    other, _ = _trained(steps=5)
    before = _snapshot(other, [{"params": params}])
    with pytest.raises(ValueError) as err:
        other.load_state_dict(_tamper(good, tamper))
    assert needle in str(err.value)
    _assert_same(before, _snapshot(other, [{"params": params}]))


def test_truncated_checkpoint_file_leaves_optimizer_usable(tmp_path):
    opt, params = _trained()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = _snapshot(opt, [{"params": params}])
    with pytest.raises(Exception):
        opt.load_state_dict(torch.load(path, weights_only=True))
    _assert_same(before, _snapshot(opt, [{"params": params}]))
    params[0].grad, params[1].grad = torch.randn(4, 3), torch.randn(5)
    opt.step()
    assert opt.param_groups[0]["step"] == 4


def test_parameters_left_on_meta_by_to_empty_are_named_instead_of_silently_not_stepped():
    # module.to_empty() gives the module new parameters (unless swap-on-conversion is set): an optimizer
    # built on the meta model holds the old ones, which never get a gradient, so each step does nothing.
    # torch's optimizers make such a step a no-op (tests/test_fused.py keeps that); ours also says why.
    model = torch.nn.Linear(64, 64, device="meta")
    opt = Adan(model.parameters(), lr=1e-2)
    model.to_empty(device="cpu")
    torch.nn.init.normal_(model.weight)
    before = model.weight.detach().clone()
    model(torch.randn(2, 64)).sum().backward()
    with pytest.warns(UserWarning, match=r"param_groups\[0\]\['params'\]\[0\] is on the meta device.*"
                                         r"does nothing.*to_empty"):
        opt.step()
    assert not opt.state and torch.equal(before, model.weight)
    # With swap-on-conversion the optimizer's parameters are the model's: it steps them, without a warning.
    saved = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model = torch.nn.Linear(64, 64, device="meta")
        opt = Adan(model.parameters(), lr=1e-2)
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(saved)
    torch.nn.init.normal_(model.weight)
    torch.nn.init.zeros_(model.bias)
    before = model.weight.detach().clone()
    model(torch.randn(2, 64)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert not torch.equal(before, model.weight)
