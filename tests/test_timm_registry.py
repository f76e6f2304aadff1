"""timm registry: names, opt_args, parameter grouping, lookahead, and timm's
own optimizer checks for adan/adanw re-stated for our class.

timm's wheel does not ship its tests; the checks of its tests/test_optim.py
that apply to ``adan``/``adanw`` (factory sanity + basic cases with
state_dict round trip, Rosenbrock with alternating coordinate gradients, a
small model whose loss must fall every step after the first) are written
here again, in our own words.
"""
import copy

import pytest
import torch
import torch.nn as nn
from timm.optim import Lookahead, create_optimizer_v2, get_optimizer_class, get_optimizer_info, list_optimizers

import adan_plugin
from adan_plugin import Adan, FusedAdan
from adan_plugin.integrations import timm as adan_timm

ADAN_VARIANTS = ["adan", "adanw", "cadan", "cadanw"]


def _groups_by_param(opt):
    return {id(p): g for g in opt.param_groups for p in g["params"]}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.pos = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def no_weight_decay(self):
        return {"pos"}

    def forward(self, x):
        x = self.bn(self.conv(x)) + self.pos
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------- registry
@pytest.mark.parametrize("name,no_prox,caution", [("adan", False, False), ("adanw", True, False),
                                                  ("cadan", False, True), ("cadanw", True, True)])
def test_names_build_our_adan(name, no_prox, caution):
    assert name in list_optimizers()
    assert get_optimizer_class(name, bind_defaults=False) is Adan
    opt = create_optimizer_v2(nn.Linear(3, 2), name, lr=0.01)
    assert type(opt) is Adan
    assert opt.defaults["no_prox"] is no_prox and opt.defaults["caution"] is caution
    # fused left to Adan (None): the kernels are used automatically when built
    assert opt.defaults["fused"] is None
    assert get_optimizer_info(name).num_betas == 3


def test_fused_names_require_the_kernel():
    for name, no_prox in (("fusedadan", False), ("fusedadanw", True)):
        assert get_optimizer_class(name, bind_defaults=False) is FusedAdan
        if adan_plugin.fused_extension_available():
            opt = create_optimizer_v2(nn.Linear(3, 2), name, lr=0.01)
            assert type(opt) is FusedAdan and opt.defaults["fused"] is True
            assert opt.defaults["no_prox"] is no_prox
        else:
            with pytest.raises(RuntimeError, match="compiled extension"):
                create_optimizer_v2(nn.Linear(3, 2), name, lr=0.01)


def test_every_adan_option_reaches_the_optimizer_through_opt_args():
    opt_args = dict(max_grad_norm=5.0, no_prox=True, foreach=False, caution=True, fused=False)
    opt = create_optimizer_v2(nn.Linear(3, 2), "adan", lr=0.02, weight_decay=0.0, eps=1e-6,
                              betas=(0.97, 0.9, 0.995), **opt_args)
    d = opt.defaults
    assert (d["lr"], d["eps"], d["betas"]) == (0.02, 1e-6, (0.97, 0.9, 0.995))
    assert {k: d[k] for k in opt_args} == opt_args
    # the same through the argparse route train.py uses (optimizer_kwargs + opt_kwargs)
    from types import SimpleNamespace
    cfg = SimpleNamespace(opt="adanw", lr=0.03, weight_decay=0.02, momentum=0.9, opt_eps=1e-8,
                          opt_betas=[0.98, 0.92, 0.9], max_grad_norm=2.0, no_prox=None,
                          opt_kwargs={"foreach": True})
    opt = adan_timm.create_optimizer(nn.Linear(3, 2), cfg)
    assert opt.defaults["betas"] == (0.98, 0.92, 0.9) and opt.defaults["max_grad_norm"] == 2.0
    assert opt.defaults["no_prox"] is True and opt.defaults["foreach"] is True  # adanw's default kept


def test_adan_keys_are_not_passed_to_other_optimizers():
    cfg = dict(opt="adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, max_grad_norm=5.0, no_prox=False)
    opt = adan_timm.create_optimizer(nn.Linear(3, 2), cfg)
    assert type(opt) is torch.optim.AdamW


def test_bad_option_is_a_clear_error():
    with pytest.raises(ValueError, match="betas"):
        create_optimizer_v2(nn.Linear(3, 2), "adan", lr=0.01, betas=(0.98, 0.92))
    with pytest.raises(TypeError, match="not_an_option"):
        create_optimizer_v2(nn.Linear(3, 2), "adan", lr=0.01, not_an_option=1)


@pytest.mark.skipif(not adan_plugin.fused_extension_available(), reason="low-memory states need the kernels")
def test_state_dtype_by_name_as_mm_configs_write_it():
    # text from --opt-kwargs or a recipe's opt_kwargs, read as the mmengine integration reads configs
    for name, dtype in (("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
                        ("float32", torch.float32), ("8bit", "8bit")):
        for opt in ("adan", "lookahead_adanw"):
            built = create_optimizer_v2(nn.Linear(3, 2), opt, lr=0.01, state_dtype=name)
            assert built.defaults["state_dtype"] == dtype, (opt, name)
    assert get_optimizer_class("adan", bind_defaults=False) is Adan  # the conversion is not in the class
    with pytest.raises(ValueError, match="state_dtype='8-bit' is neither '8bit'"):
        create_optimizer_v2(nn.Linear(3, 2), "adan", lr=0.01, state_dtype="8-bit")


@pytest.mark.skipif(not adan_plugin.fused_extension_available(), reason="8-bit states need the kernels")
@pytest.mark.parametrize("name,no_prox", [("adan8bit", False), ("adanw8bit", True), ("lookahead_adan8bit", False)])
def test_8bit_names_build_adan_with_8bit_states(name, no_prox):
    model = nn.Linear(128, 64)  # an 8192-element weight (quantized) and a 64-element bias (fp32 states)
    opt = create_optimizer_v2(model, name, lr=0.01)
    adan = getattr(opt, "_base_optimizer", opt)  # timm's Lookahead wraps ours
    assert type(adan) is Adan and adan.defaults["state_dtype"] == "8bit" and adan.defaults["no_prox"] is no_prox
    model(torch.randn(4, 128)).sum().backward()
    opt.step()
    state = adan.state[model.weight]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8
    assert adan.state[model.bias]["exp_avg"].dtype == torch.float32
    # an explicit state_dtype (--opt-kwargs, a recipe's opt_kwargs) wins over the name's
    assert create_optimizer_v2(model, name, lr=0.01, state_dtype="bfloat16").param_groups[0]["state_dtype"] \
        == torch.bfloat16


# ----------------------------------------------------------------- grouping
def test_default_grouping_exempts_1d_and_no_weight_decay_params():
    model = TinyNet()
    opt = create_optimizer_v2(model, "adan", lr=0.01, weight_decay=0.02)
    groups = _groups_by_param(opt)
    for name, p in model.named_parameters():
        expected = 0.0 if (p.ndim <= 1 or name == "pos") else 0.02
        assert groups[id(p)]["weight_decay"] == expected, name


def test_bias_decay_puts_weight_decay_on_every_param():
    model = TinyNet()
    opt = adan_timm.create_optimizer(model, dict(opt="adan", lr=0.01, weight_decay=0.02, momentum=0.9,
                                                 bias_decay=True))
    groups = _groups_by_param(opt)
    assert len(groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.02 for g in groups.values())


def test_layer_decay_scales_lr_per_layer():
    import timm
    model = timm.create_model("test_vit", num_classes=3)
    opt = create_optimizer_v2(model, "adan", lr=0.01, weight_decay=0.02, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[0] < 0.5
    head = _groups_by_param(opt)[id(model.head.weight)]
    assert head["lr_scale"] == 1.0 and head["weight_decay"] == 0.02
    # with bias_decay too: layer-wise lr and decay on 1-d params
    opt = adan_timm.create_optimizer(model, dict(opt="adan", lr=0.01, weight_decay=0.02, momentum=0.9,
                                                 layer_decay=0.5, bias_decay=True))
    assert len({g["lr_scale"] for g in opt.param_groups}) == len(scales)
    assert all(g["weight_decay"] == 0.02 for g in opt.param_groups)


def test_lookahead_prefix_wraps_our_adan():
    model = nn.Linear(4, 1)
    opt = create_optimizer_v2(model, "lookahead_adan", lr=0.05, max_grad_norm=1.0)
    assert isinstance(opt, Lookahead) and type(opt._base_optimizer) is Adan
    assert opt.defaults["max_grad_norm"] == 1.0
    before = model.weight.detach().clone()
    for _ in range(6):  # k=6 fast steps, then the slow weights move
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    assert not torch.equal(model.weight, before)
    assert "lookahead_slow_buff" in opt._base_optimizer.state[model.weight]


# ------------------------------------------ timm's test_optim checks, re-stated
def _quadratic_problem(weight, bias, x):
    def closure(opt):
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss
    return closure


def _check_basic(make_opt):
    """Loss falls over 200 steps; a state_dict round trip gives identical trajectories."""
    for weight, bias in ((torch.randn(10, 5), torch.randn(10)),
                         (torch.randn(10, 5, 2)[..., 0], torch.randn(10, 2)[..., 0])):  # non-contiguous too
        w, b = nn.Parameter(weight), nn.Parameter(bias)
        x = torch.randn(5)
        opt = make_opt(w, b)
        repr(opt)
        closure = _quadratic_problem(w, b, x)
        start = closure(opt).item()
        for _ in range(200):
            opt.step(lambda: closure(opt))
        assert closure(opt).item() < start

    w, b, x = nn.Parameter(torch.randn(10, 5)), nn.Parameter(torch.randn(10)), torch.randn(5)
    opt = make_opt(w, b)
    closure = _quadratic_problem(w, b, x)
    for _ in range(20):
        opt.step(lambda: closure(opt))
    w2, b2 = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    opt2 = make_opt(w2, b2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    closure2 = _quadratic_problem(w2, b2, x)
    for _ in range(20):
        opt.step(lambda: closure(opt))
        opt2.step(lambda: closure2(opt2))
        torch.testing.assert_close(w2, w, rtol=0, atol=0)
        torch.testing.assert_close(b2, b, rtol=0, atol=0)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for key, v in s1["state"][k].items():
            torch.testing.assert_close(s2["state"][k][key], v, rtol=0, atol=0)
    public = lambda o: {k for k in vars(o) if not k.startswith("_")}  # noqa: E731
    assert public(opt) == public(copy.deepcopy(opt))


@pytest.mark.parametrize("name", ADAN_VARIANTS)
def test_timm_factory_basic_cases(name):
    lr = 1e-2
    _check_basic(lambda w, b: create_optimizer_v2([w, b], name, lr=lr))
    _check_basic(lambda w, b: create_optimizer_v2([{"params": [w]}, {"params": [b], "lr": lr}], name, lr=lr / 10))
    _check_basic(lambda w, b: create_optimizer_v2([{"params": b, "lr": lr}], name, lr=lr / 10))
    _check_basic(lambda w, b: create_optimizer_v2([{"params": b, "lr": lr}], name))


def _rosenbrock_grad(xy):
    x, y = xy
    return torch.stack([-400 * x * (y - x * x) - 2 * (1 - x), 200 * (y - x * x)])


@pytest.mark.parametrize("name", ADAN_VARIANTS)
def test_timm_rosenbrock_coordinate_descent(name):
    p = nn.Parameter(torch.tensor([1.5, 1.5]))
    opt = create_optimizer_v2([p], name, lr=1e-3)
    solution = torch.tensor([1.0, 1.0])
    start = p.detach().dist(solution)
    for i in range(2000):
        g = _rosenbrock_grad(p.detach())
        mask = torch.tensor([1.0, 0.0]) if i % 2 else torch.tensor([0.0, 1.0])  # one coordinate per step
        p.grad = g * mask
        opt.step()
    assert torch.isfinite(p).all()
    assert p.detach().dist(solution) <= start


@pytest.mark.parametrize("name", ADAN_VARIANTS)
def test_timm_small_model_loss_falls_after_first_step(name):
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-0.2109, -0.4976], [-0.1413, -0.3420], [-0.2524, 0.6976]]))
        model[0].bias.copy_(torch.tensor([-0.1085, -0.2979, 0.6892]))
        model[2].weight.copy_(torch.tensor([[-0.0508, -0.3941, -0.2843]]))
        model[2].bias.copy_(torch.tensor([-0.0711]))
    x = torch.arange(1, 7, dtype=torch.float32).reshape(3, 2) / 10
    opt = create_optimizer_v2(model, opt=name, lr=5e-2)
    prev = float("inf")
    for i in range(20):
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        if i > 1:  # Adan, like ADOPT in timm's test, is not required to descend on its first step
            assert loss.item() < prev
        prev = loss.item()
        opt.step()
