"""skip_nonfinite: a NaN/Inf gradient skips the step on the device and loses nothing."""
import pytest
import torch

from adan_plugin import Adan, _ext
from problems import make_problem, param_groups, reference_groups, run_torch
from reference import RefAdan

pytestmark = pytest.mark.skipif(not _ext.extension_loaded(), reason="needs the compiled fused kernels")


@pytest.mark.parametrize("clip", [None, "binding"])
def test_poisoned_steps_are_skipped_like_they_never_happened(clip):
    prob = make_problem(31, steps=30, clip=clip, none_prob=0.0)
    poisoned = {0, 1, 7, 8, 20}  # first steps too: a parameter's first gradient must stay "first"
    seq = []
    for i, grads in enumerate(prob.grads):
        if i in poisoned:
            grads = [[g.clone() for g in gs] for gs in grads]
            grads[i % len(grads)][0].view(-1)[:1] = float("nan") if i % 2 else float("inf")
            if grads[i % len(grads)][0].numel() == 0:
                grads[i % len(grads)][1].view(-1)[:1] = float("nan")
        seq.append(grads)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, skip_nonfinite=True)
    run_torch(opt, groups, seq)

    ref = RefAdan(reference_groups(prob), max_grad_norm=prob.max_grad_norm)
    for i, grads in enumerate(prob.grads):
        if i not in poisoned:
            ref.step(grads)
    for ours, theirs in zip(groups, ref.params()):
        for p, r in zip(ours["params"], theirs):
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p.detach().double(), r, rtol=2e-5, atol=2e-6)
    assert int(opt.skipped_steps) == len(poisoned)
    assert all(int(g["step"]) == len(prob.grads) - len(poisoned) for g in opt.param_groups)


def test_without_the_option_nan_reaches_the_parameters():
    # The behaviour the option exists for: torch.optim semantics by default.
    p = torch.nn.Parameter(torch.randn(4))
    opt = Adan([p], lr=1e-2)
    p.grad = torch.tensor([float("nan"), 0.0, 0.0, 0.0])
    opt.step()
    assert torch.isnan(p).any()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(fused=False), "fused=False"),
    (dict(foreach=True), "foreach=True"),
    (dict(caution=True), "caution"),
])
def test_needs_the_fused_path(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Adan([torch.nn.Parameter(torch.randn(3))], skip_nonfinite=True, **kwargs)


def test_is_set_once_per_optimizer():
    opt = Adan([torch.nn.Parameter(torch.randn(3))], skip_nonfinite=True)
    with pytest.raises(ValueError, match="skip_nonfinite acts on the gradients of all groups"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "skip_nonfinite": False})
    assert len(opt.param_groups) == 1
