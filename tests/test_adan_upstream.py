"""Trajectories and checkpoints against the installed timm and mmpretrain Adans."""
import io

import pytest
import torch
from mmpretrain.engine.optimizers.adan_t import Adan as MMAdan
from timm.optim.adan import Adan as TimmAdan

from adan_plugin import Adan
from adan_plugin.checkpoint import convert_state_dict
from problems import make_problem, param_groups, run_torch

OURS = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False)}
HP = ("lr", "betas", "eps", "weight_decay", "no_prox")


def _params(groups):
    return [p.detach().clone() for g in groups for p in g["params"]]


def _assert_close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("path", OURS)
@pytest.mark.parametrize("timm_foreach", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_trajectory_matches_timm(path, timm_foreach, seed):
    prob = make_problem(seed, steps=60)
    g_ours, g_timm = param_groups(prob, keys=HP), param_groups(prob, keys=HP)
    run_torch(Adan(g_ours, **OURS[path]), g_ours, prob.grads)
    run_torch(TimmAdan(g_timm, foreach=timm_foreach), g_timm, prob.grads)
    _assert_close(_params(g_ours), _params(g_timm))


# mmpretrain's foreach path never applies the update when no_prox=True (it
# only multiplies by 1 - lr*wd), so it is compared on its single-tensor path
# there; its foreach path is compared with the proximal decay it handles, and
# with every gradient present (it fails on a group without gradients).
@pytest.mark.parametrize("path", OURS)
@pytest.mark.parametrize("mm_foreach", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_trajectory_matches_mmpretrain_with_clip(path, mm_foreach, seed):
    prob = make_problem(seed, steps=60, clip="binding", scalars=False, none_prob=0.0 if mm_foreach else 0.1)
    if mm_foreach:
        for g in prob.groups:
            g["no_prox"] = False
    g_ours, g_mm = param_groups(prob, keys=HP), param_groups(prob, keys=HP)
    run_torch(Adan(g_ours, max_grad_norm=prob.max_grad_norm, **OURS[path]), g_ours, prob.grads)
    run_torch(MMAdan(g_mm, max_grad_norm=prob.max_grad_norm, foreach=mm_foreach), g_mm, prob.grads)
    _assert_close(_params(g_ours), _params(g_mm), rtol=5e-5, atol=5e-6)


def _continue_from(make_first, make_second, prob, k, convert=lambda sd: sd, clip=0.0):
    """k steps with ``make_first``, checkpoint through bytes, the rest with ``make_second``."""
    groups = param_groups(prob, keys=HP)
    first = make_first(groups)
    run_torch(first, groups, prob.grads[:k])
    sd = _roundtrip(convert(first.state_dict()))
    second = make_second(groups)
    second.load_state_dict(sd)
    run_torch(second, groups, prob.grads[k:])
    return _params(groups)


@pytest.mark.parametrize("direction", ["ours->timm", "timm->ours"])
def test_checkpoint_exchange_with_timm(direction):
    prob = make_problem(21, steps=40)
    ours = lambda gs: Adan(gs, foreach=False, fused=False)  # noqa: E731
    timm = lambda gs: TimmAdan(gs, foreach=False)  # noqa: E731
    straight = _continue_from(ours, ours, prob, 40)
    mixed = _continue_from(*((ours, timm) if direction == "ours->timm" else (timm, ours)), prob, 20)
    _assert_close(mixed, straight)


@pytest.mark.parametrize("direction", ["ours->mmpretrain", "mmpretrain->ours"])
def test_checkpoint_exchange_with_mmpretrain(direction):
    prob = make_problem(22, steps=40, clip="binding", scalars=False)
    clip = prob.max_grad_norm
    ours = lambda gs: Adan(gs, max_grad_norm=clip, foreach=False, fused=False)  # noqa: E731
    mm = lambda gs: MMAdan(gs, max_grad_norm=clip, foreach=False)  # noqa: E731
    straight = _continue_from(ours, ours, prob, 40)
    if direction == "ours->mmpretrain":
        mixed = _continue_from(ours, mm, prob, 20, convert=lambda sd: convert_state_dict(sd, "mmpretrain"))
    else:
        mixed = _continue_from(mm, ours, prob, 20)
    _assert_close(mixed, straight, rtol=5e-5, atol=5e-6)


def test_mmpretrain_needs_the_converted_checkpoint():
    # Without pre_grad, mmpretrain restarts the gradient difference at zero:
    # the trajectories then differ, which is why convert_state_dict exists.
    prob = make_problem(22, steps=40, clip="binding", scalars=False)
    clip = prob.max_grad_norm
    ours = lambda gs: Adan(gs, max_grad_norm=clip, foreach=False, fused=False)  # noqa: E731
    mm = lambda gs: MMAdan(gs, max_grad_norm=clip, foreach=False)  # noqa: E731
    straight = _continue_from(ours, ours, prob, 40)
    unconverted = _continue_from(ours, mm, prob, 20)
    assert max((a - b).abs().max().item() for a, b in zip(unconverted, straight) if a.numel()) > 1e-4
