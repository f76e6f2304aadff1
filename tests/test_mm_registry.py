"""Adan in mmengine/mmpretrain registries: scopes, options from config, paramwise_cfg, wrappers."""
import copy
import logging
import sys

import pytest
import torch
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper
from mmengine.registry import OPTIMIZERS, DefaultScope, Registry

import adan_plugin
from adan_plugin import Adan, FusedAdan
from adan_plugin.integrations.mmengine import claim_adan

ADAN = dict(type="Adan", lr=0.01, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 4))

    def forward(self, x):
        x = self.bn(self.conv(x)).mean((2, 3)) + self.cls_token
        return self.fc(x)


@pytest.mark.parametrize("scope_name", ["mmengine", "mmpretrain"])  # mmengine: the root registry
def test_type_adan_builds_ours_in_every_scope(scope_name):
    with DefaultScope.overwrite_default_scope(scope_name):
        wrapper = build_optim_wrapper(Net(), dict(optimizer=dict(ADAN)))
        assert type(wrapper.optimizer) is Adan
        wrapper = build_optim_wrapper(Net(), dict(optimizer=dict(ADAN, type="FusedAdan", fused=False)))
        assert type(wrapper.optimizer) is FusedAdan


def test_mmpretrain_scope_keeps_its_own_adan_reachable_under_another_name():
    import mmpretrain.registry

    child = mmpretrain.registry.OPTIMIZERS
    assert child.get("Adan") is Adan
    theirs = child.get("MMPretrainAdan")
    assert theirs is not Adan and theirs.__module__.startswith("mmpretrain.")
    assert OPTIMIZERS.get("Adan") is Adan


def test_claim_replaces_a_scope_own_adan_after_its_lazy_import_with_one_log_line(tmp_path, monkeypatch):
    # A package registering its own 'Adan' when its registry's locations are imported, like mmpretrain.
    (tmp_path / "fake_scope_optim.py").write_text(
        "import torch\n"
        "from tests_fake_registry import OPTIMIZERS\n"
        "@OPTIMIZERS.register_module()\n"
        "class Adan(torch.optim.SGD):\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    child = Registry("optimizer", parent=OPTIMIZERS, scope="adanfakescope", locations=["fake_scope_optim"])
    monkeypatch.setitem(sys.modules, "tests_fake_registry", type(sys)("tests_fake_registry"))
    sys.modules["tests_fake_registry"].OPTIMIZERS = child
    try:
        claim_adan(child)
        assert "Adan" not in child._module_dict  # nothing registered before the package's own import
        logger = MMLogger.get_current_instance()
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        try:
            assert child.get("Adan") is Adan
            assert child.get("Adan") is Adan
            assert child.get("adanfakescope_Adan").__module__ == "fake_scope_optim"
        finally:
            logger.removeHandler(handler)
        said = [r.getMessage() for r in records if "adan_plugin" in r.getMessage()]
        assert len(said) == 1 and "type='Adan' in scope 'adanfakescope' builds adan_plugin.Adan" in said[0]
    finally:
        OPTIMIZERS._children.pop("adanfakescope", None)


def test_every_adan_option_reaches_the_optimizer_from_config():
    cfg = dict(type="Adan", lr=0.02, betas=[0.9, 0.9, 0.95], eps=1e-6, weight_decay=0.05, max_grad_norm=5.0,
               no_prox=True, caution=True, foreach=True, fused=False)
    opt = build_optim_wrapper(Net(), dict(optimizer=cfg)).optimizer
    for key, value in cfg.items():
        if key != "type":
            assert opt.defaults[key] == (tuple(value) if key == "betas" else value), key


@pytest.mark.skipif(not adan_plugin.fused_extension_available(), reason="needs the compiled extension")
@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("torch.float32", torch.float32)])
def test_state_dtype_is_read_from_its_name(name, dtype):
    net = Net()
    wrapper = build_optim_wrapper(net, dict(optimizer=dict(ADAN, state_dtype=name)))
    assert wrapper.optimizer.defaults["state_dtype"] is dtype
    wrapper.update_params(net(torch.randn(2, 1, 5, 5)).sum())
    assert {st["exp_avg_sq"].dtype for st in wrapper.optimizer.state.values()} == {dtype}


def test_unknown_or_malformed_options_fail_clearly():
    with pytest.raises(TypeError, match=r"Adan: unknown option 'max_grad_nrom' \(did you mean 'max_grad_norm'\?\)"):
        build_optim_wrapper(Net(), dict(optimizer=dict(ADAN, max_grad_nrom=1.0)))
    with pytest.raises(ValueError, match="state_dtype='bf16' is neither '8bit' .* nor a torch dtype name"):
        build_optim_wrapper(Net(), dict(optimizer=dict(ADAN, state_dtype="bf16")))
    # FusedAdan takes **kwargs (handed on to Adan): its options are Adan's
    hint = r"FusedAdan: unknown option 'max_grad_nrom' \(did you mean 'max_grad_norm'\?\)"
    with pytest.raises(TypeError, match=hint):
        build_optim_wrapper(Net(), dict(optimizer=dict(ADAN, type="FusedAdan", fused=False, max_grad_nrom=1.0)))
    # ZeRO checks before it needs a process group
    with pytest.raises(TypeError, match="Adan: unknown option 'nop_rox'"):
        build_optim_wrapper(Net(), dict(optimizer=dict(ADAN, type="ZeroRedundancyOptimizer",
                                                       optimizer_type="Adan", nop_rox=True)))
    with DefaultScope.overwrite_default_scope("mmpretrain"):
        with pytest.raises(TypeError, match="Adan: unknown option 'weight_decy'"):
            build_optim_wrapper(Net(), dict(optimizer=dict(ADAN, weight_decy=0.1)))
        with pytest.raises(ValueError, match="invalid lr"):
            build_optim_wrapper(Net(), dict(optimizer=dict(ADAN, lr=-1.0)))


def test_paramwise_cfg_sets_per_parameter_weight_decay():
    net = Net()
    paramwise = dict(norm_decay_mult=0.0, bias_decay_mult=0.5, custom_keys={"cls_token": dict(decay_mult=0.0),
                                                                             "fc": dict(lr_mult=0.1)})
    opt = build_optim_wrapper(net, dict(optimizer=dict(ADAN), paramwise_cfg=paramwise)).optimizer
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    name_to_group = {name: by_param[id(p)] for name, p in net.named_parameters()}
    wd = {name: g["weight_decay"] for name, g in name_to_group.items()}
    assert wd == {"cls_token": 0.0, "conv.weight": 0.02, "conv.bias": 0.01, "bn.weight": 0.0, "bn.bias": 0.0,
                  "fc.weight": 0.02, "fc.bias": 0.02}  # custom_keys take precedence over bias_decay_mult
    assert name_to_group["fc.weight"]["lr"] == pytest.approx(0.001)
    # the groups train: one step moves every parameter
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net(torch.randn(4, 1, 5, 5)).pow(2).sum().backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in net.named_parameters())


def _cpu_amp_wrapper(monkeypatch, optimizer_cfg, init_scale):
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp

    # mmengine only allows AmpOptimWrapper with CUDA; torch's GradScaler works on CPU.
    monkeypatch.setattr(amp, "is_cuda_available", lambda: True)
    monkeypatch.setattr(amp, "GradScaler", lambda **kw: torch.amp.GradScaler("cpu", **kw))
    torch.manual_seed(0)
    net = Net()
    wrapper = build_optim_wrapper(net, dict(type="AmpOptimWrapper", loss_scale=dict(init_scale=init_scale),
                                            optimizer=optimizer_cfg))
    return net, wrapper


@pytest.mark.parametrize("fused", [False, True])
def test_amp_optim_wrapper_scales_and_skips_overflowing_steps(monkeypatch, fused):
    if fused and not adan_plugin.fused_extension_available():
        pytest.skip("needs the compiled extension")
    cfg = dict(ADAN, max_grad_norm=1.0, fused=fused)
    net, wrapper = _cpu_amp_wrapper(monkeypatch, cfg, init_scale=1024.0)
    assert wrapper.optimizer._step_supports_amp_scaling == fused  # fused: GradScaler hands over found_inf
    torch.manual_seed(0)
    ref_net = Net()
    ref = Adan(ref_net.parameters(), **{k: v for k, v in cfg.items() if k != "type"})
    x = torch.randn(4, 1, 5, 5)
    for _ in range(3):
        wrapper.update_params(net(x).pow(2).mean())
        ref_net(x).pow(2).mean().backward()
        ref.step()
        ref.zero_grad()
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    params = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(wrapper.optimizer.state_dict())
    scale = wrapper.loss_scaler.get_scale()
    wrapper.update_params(net(x).pow(2).mean() * float("inf"))
    assert wrapper.loss_scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(params, net.parameters()))
    after = wrapper.optimizer.state_dict()
    assert [g["step"] for g in after["param_groups"]] == [g["step"] for g in state["param_groups"]]
    for i, st in state["state"].items():
        for key, value in st.items():
            assert torch.equal(value, after["state"][i][key]), key
