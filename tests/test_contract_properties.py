"""Property-based tests of the optimizer contract (hypothesis): for any corruption of a valid checkpoint and
any set of options, Adan either refuses with an error naming the problem and changes nothing, or accepts
something that then steps correctly."""
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adan_plugin import Adan
from adan_plugin.functional import STATE_KEYS
from contract_helpers import PATHS, assert_unchanged, snapshot, trained

def default_state_dtype(p, state_dtype):
    """The documented rule: state_dtype, else the parameter's dtype, except fp32 for fp16 parameters."""
    return state_dtype or (torch.float32 if p.dtype == torch.float16 else p.dtype)


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ checkpoints
GROUP_KEYS = ["lr", "betas", "eps", "weight_decay", "max_grad_norm", "no_prox", "caution", "foreach", "fused",
              "state_dtype", "capturable", "skip_nonfinite", "step", "params", "initial_lr"]
ODD_VALUES = [-1, 0, 1, 2.5, float("nan"), float("inf"), 1e-3, "x", "0.1", True, False, None, (0.9, 0.9),
              (0.9, 0.9, 0.9), (0.9, 1.0, 0.9), [0.98, 0.92, 0.99], torch.tensor(0.01), torch.tensor(float("nan")),
              torch.tensor([1.0, 2.0]), torch.tensor(-1.0), torch.tensor(3.0), torch.tensor(2.0, device="meta"),
              torch.float16, torch.bfloat16, [], [0, 1], {}]


def _tensor_variants(t):
    return [
        t[..., :1] if t.dim() else t.reshape(1, 1),     # wrong shape
        t.to(torch.int32), t.half(), t.double(), t.bfloat16(), t.to(torch.complex64),
        torch.empty(t.shape, device="meta"), t.detach().clone().reshape(-1) if t.dim() > 1 else t.reshape(1, -1),
        float(t.flatten()[0]) if t.numel() else 0.0, None, t.tolist(),
        torch.full_like(t, float("nan")), t.detach().clone(),
    ]


corruption = st.one_of(
    st.tuples(st.just("drop_group_key"), st.integers(0, 1), st.sampled_from(GROUP_KEYS)),
    st.tuples(st.just("set_group_key"), st.integers(0, 1), st.sampled_from(GROUP_KEYS), st.sampled_from(ODD_VALUES)),
    st.tuples(st.just("extra_group_key"), st.integers(0, 1), st.text(min_size=1, max_size=8)),
    st.tuples(st.just("drop_state_key"), st.integers(0, 3), st.sampled_from(list(STATE_KEYS) + ["step"])),
    st.tuples(st.just("set_state_key"), st.integers(0, 3),
              st.sampled_from(list(STATE_KEYS) + ["pre_grad", "step", "momentum_buffer"]), st.integers(0, 12)),
    st.tuples(st.just("drop_group")),
    st.tuples(st.just("orphan_state"), st.sampled_from([7, -1, "a"])),
    st.tuples(st.just("not_a_dict"), st.sampled_from([None, [], "sd", 3])),
    st.tuples(st.just("other_optimizer"), st.sampled_from(["sgd", "adamw", "adam"]), st.booleans()),
)


def _corrupt(sd, params, how):
    kind = how[0]
    if kind == "drop_group_key":
        sd["param_groups"][how[1]].pop(how[2], None)
    elif kind == "set_group_key":
        sd["param_groups"][how[1]][how[2]] = copy.deepcopy(how[3])
    elif kind == "extra_group_key":
        sd["param_groups"][how[1]][how[2]] = 0.5
    elif kind == "drop_state_key":
        sd["state"][how[1]].pop(how[2], None)
    elif kind == "set_state_key":
        st_ = sd["state"][how[1]]
        base = st_["exp_avg"]
        st_[how[2]] = _tensor_variants(base)[how[3]]
    elif kind == "drop_group":
        sd["param_groups"].pop()
    elif kind == "orphan_state":
        sd["state"][how[1]] = {k: torch.zeros(3) for k in STATE_KEYS}
    elif kind == "not_a_dict":
        return how[1]
    elif kind == "other_optimizer":
        make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1),
                "adam": lambda ps: torch.optim.Adam(ps, lr=0.1)}[how[1]]
        other = make([{"params": params[:2]}, {"params": params[2:]}])
        if how[2]:
            for p in params:
                p.grad = torch.randn_like(p)
            other.step()
        return copy.deepcopy(other.state_dict())
    return sd


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(how=corruption)
def test_a_corrupted_checkpoint_is_refused_unchanged_or_loads_and_steps(path, how):
    source, params = trained(**PATHS[path])
    sd = _corrupt(copy.deepcopy(source.state_dict()), params, how)
    target, tparams = trained(steps=4, seed=1, **PATHS[path])
    before = snapshot(target)
    try:
        target.load_state_dict(sd)
    except ValueError as err:
        assert str(err).startswith("Adan.load_state_dict") and len(str(err)) > 40
        assert_unchanged(before, snapshot(target))
        return
    # Accepted: it must step, with states of the parameters' shapes and dtypes, and count the step.
    steps_before = [float(g.get("step", 0)) for g in target.param_groups]
    for p in tparams:
        p.grad = torch.randn_like(p)
    target.step()
    assert [float(g["step"]) for g in target.param_groups] == [s + 1 for s in steps_before]
    for group in target.param_groups:
        hyper_finite = all(math.isfinite(float(group[k])) for k in ("lr", "eps", "weight_decay"))
        for p in group["params"]:
            st_ = target.state[p]
            for k in STATE_KEYS:
                assert st_[k].shape == p.shape
                assert st_[k].dtype == default_state_dtype(p, group["state_dtype"])
            if hyper_finite and float(group["lr"]) <= 1 and float(group["weight_decay"]) <= 1:
                nan_state = any(torch.isnan(st_[k]).any() for k in STATE_KEYS)
                assert nan_state or torch.isfinite(p).all()


# ------------------------------------------------------------------ hyper-parameters and options
def _scalar(valid):
    return st.one_of(valid, valid.map(torch.tensor), valid.map(lambda x: torch.tensor([x])))


VALID = dict(
    lr=_scalar(st.floats(0, 1)),
    eps=_scalar(st.floats(1e-12, 1)),
    weight_decay=_scalar(st.floats(0, 0.5)),
    max_grad_norm=st.floats(0, 10),
    betas=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999), st.floats(0, 0.999)),
    no_prox=st.booleans(),
    caution=st.booleans(),
    foreach=st.sampled_from([None, True, False]),
    fused=st.sampled_from([None, True, False]),
    state_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]),
    skip_nonfinite=st.booleans(),
)
INVALID = st.sampled_from([-1.0, -1e-9, float("nan"), float("inf"), "0.1", True, None, torch.tensor(float("nan")),
                           torch.tensor(-0.5), torch.tensor([0.1, 0.2]), torch.tensor(True), 1j, (0.9, 0.9),
                           (0.9, 0.9, 1.0), (0.9, -0.1, 0.9), "false", 1, 0, torch.float16, torch.float64,
                           "bfloat16"])


@st.composite
def options(draw):
    kw = {}
    for key, strategy in VALID.items():
        if draw(st.booleans()):
            kw[key] = draw(st.one_of(strategy, INVALID) if draw(st.integers(0, 5)) == 0 else strategy)
    return kw


def _steps_finitely(opt, params):
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@SETTINGS
@given(kw=options())
def test_constructor_refuses_or_builds_an_optimizer_that_steps(kw):
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), ()]]
    try:
        opt = Adan(params, **kw)
    except (ValueError, TypeError) as err:
        assert "Adan" in str(err)
        return
    except RuntimeError as err:  # fused options without the compiled extension
        assert "pip install" in str(err)
        return
    _steps_finitely(opt, params)


@SETTINGS
@given(kw=options())
def test_add_param_group_refuses_unchanged_or_adds_a_group_that_steps(kw):
    opt, params = trained()
    kw.pop("max_grad_norm", None), kw.pop("skip_nonfinite", None)  # optimizer-wide: inherited
    new = torch.nn.Parameter(torch.randn(4, 2))
    before = snapshot(opt)
    try:
        opt.add_param_group({"params": [new], **kw})
    except (ValueError, TypeError, RuntimeError) as err:
        assert "Adan" in str(err)
        assert len(opt.param_groups) == 2
        assert_unchanged(before, snapshot(opt))
        return
    _steps_finitely(opt, params + [new])
