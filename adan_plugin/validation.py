"""What Adan accepts: hyper-parameters, options and checkpoints, checked before anything changes.

Everything here reads and raises; nothing mutates an optimizer.  ``Adan`` calls
:func:`check_group` from its constructor and ``add_param_group``,
:func:`step_hyperparameters` at the start of ``step()`` (before the first
write) and :func:`prepare_state_dict` from ``load_state_dict``, which then
installs what it returns in one assignment.

Per-parameter state entries are checked and converted through
:data:`STATE_ENTRIES`, a table ``key -> StateEntry(check, convert)``: a new
kind of state registers its keys with :func:`register_state_entry` instead of
editing the loader.  Entries that only make sense together (8-bit codes and
their ``_scale`` tensors, see :mod:`adan_plugin.lowmem`) register a
:class:`StateHook` with :func:`register_state_hook`: it sees a parameter's
whole saved state, checks it before anything is converted, takes over the
keys it claims and adapts the converted state (e.g. float <-> 8-bit).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .distributed import is_dtensor

# Hyper-parameters (the checkpoint's, see Adan.load_state_dict) and execution choices (the constructor's).
REQUIRED_HPARAMS = ("lr", "betas", "eps", "weight_decay")
OPTIONAL_HPARAMS = ("max_grad_norm", "no_prox", "caution", "skip_nonfinite")
IMPL_KEYS = ("foreach", "fused", "state_dtype", "capturable", "fused_backend", "kahan_sum")
# Options that act on all groups together, so every group must hold the same value.
GLOBAL_KEYS = ("max_grad_norm", "skip_nonfinite")
BOOL_KEYS = ("no_prox", "caution", "capturable", "skip_nonfinite", "kahan_sum")
OPTIONAL_BOOL_KEYS = ("foreach", "fused")
SCALAR_KEYS = ("lr", "eps", "weight_decay", "max_grad_norm")

# "8bit": block-wise 8-bit states (adan_plugin.lowmem), fp32 ones for small parameters.
EIGHT_BIT = "8bit"
STATE_DTYPES = (None, torch.float32, torch.bfloat16, EIGHT_BIT)
FP16_STATE_REASON = (
    "float16 optimizer states are refused: exp_avg_sq holds squared gradients and float16 overflows "
    "above 65504, i.e. for |g| above ~256, after which updates silently stop; use torch.bfloat16 "
    "(fp32's range, same memory) or None")
_16BIT = (torch.float16, torch.bfloat16)


def _is_real_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _scalar_value(name: str, value: Any) -> float:
    """The float value of a hyper-parameter given as a number or a one-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Adan: Tensor {name} must be 1-element, got a tensor of shape {tuple(value.shape)}")
        if value.device.type == "meta":
            raise ValueError(f"Adan: {name} is a meta tensor, which holds no value")
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"Adan: {name} must be a real number, got a {value.dtype} tensor")
        return float(value.reshape(()))  # a CUDA tensor: a host read, at construction or load only
    if not _is_real_number(value):
        raise ValueError(f"Adan: {name} must be a real number or a one-element tensor, got {value!r}")
    return float(value)


def _check_nonnegative(name: str, value: Any) -> None:
    x = _scalar_value(name, value)
    if not (x >= 0.0 and math.isfinite(x)):
        raise ValueError(f"Adan: invalid {name}={x!r}; it must be a finite number >= 0")


def check_group(group: Dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyper-parameter or option of ``group``."""
    for name in SCALAR_KEYS:
        _check_nonnegative(name, group[name])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 3:
        raise ValueError(f"Adan: betas must be a tuple of three floats (beta1, beta2, beta3), got {betas!r}")
    for i, beta in enumerate(betas):
        b = _scalar_value(f"betas[{i}]", beta)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Adan: invalid betas[{i}]={b!r}; each beta must lie in [0, 1)")
    for key in BOOL_KEYS:
        if type(group[key]) is not bool:
            raise ValueError(f"Adan: {key} must be True or False, got {group[key]!r}")
    for key in OPTIONAL_BOOL_KEYS:
        if group[key] is not None and type(group[key]) is not bool:
            raise ValueError(f"Adan: {key} must be None, True or False, got {group[key]!r}")
    if group["fused"] and group["foreach"]:
        raise ValueError("Adan: fused=True and foreach=True are mutually exclusive")
    sd = group["state_dtype"]
    if isinstance(sd, torch.dtype) and sd == torch.float16:
        raise ValueError(f"Adan: state_dtype=torch.float16: {FP16_STATE_REASON}")
    if not any(sd is d or (d is not None and type(sd) is type(d) and sd == d) for d in STATE_DTYPES):
        raise ValueError(f"Adan: state_dtype must be one of {STATE_DTYPES}, got {sd!r}")


def check_same_global_options(groups: Sequence[Dict[str, Any]], where: str = "") -> None:
    for key in GLOBAL_KEYS:
        values = [g[key] for g in groups]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"Adan{where}: {key} acts on the gradients of all groups together, so every group "
                             f"must hold the same value; got {values}")


def host_float(value: Any) -> float:
    """A number or one-element tensor as a Python float (a host read for a device tensor)."""
    return float(value.reshape(())) if isinstance(value, Tensor) else float(value)


def step_hyperparameters(group: Dict[str, Any]) -> Dict[str, float]:
    """The group's hyper-parameters as host floats, for ``step()``.

    A CPU tensor (how schedulers keep a tensor lr) is read without a device
    sync and checked again here, since it may have been changed in place
    since construction; a CUDA tensor is read (a host read per step: keep lr
    a float or a CPU tensor) but was only checked at construction or load.
    """
    out = {}
    for name in ("lr", "eps", "weight_decay", "max_grad_norm"):
        value = group[name]
        x = host_float(value)
        if isinstance(value, Tensor) and value.device.type == "cpu" and not (x >= 0.0 and math.isfinite(x)):
            raise ValueError(f"Adan.step: {name} is a tensor that now holds {x!r}; it must be a finite number >= 0")
        out[name] = x
    betas = [host_float(b) for b in group["betas"]]
    out["beta1"], out["beta2"], out["beta3"] = betas
    return out


def default_state_dtype(param: Tensor, state_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype of a parameter's float states: ``state_dtype``, else the parameter's, except fp32 for
    fp16; fp32 under ``"8bit"`` (parameters too small to quantize, and the dtype 8-bit states load from).
    A complex parameter's states are always of its dtype (no 16-bit or 8-bit complex states)."""
    if param.is_complex():
        return param.dtype
    if state_dtype == EIGHT_BIT:
        return torch.float32
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if param.dtype == torch.float16 else param.dtype


def is_16bit(t: Tensor) -> bool:
    return t.dtype in _16BIT


# ------------------------------------------------------------------ state entries
@dataclass(frozen=True)
class StateEntry:
    """How to check and convert one key of a parameter's state.

    ``check(value, param, where)`` raises ``ValueError``; ``convert(value, param,
    group)`` returns the value to install (never the caller's object when it
    must be changed).
    """
    check: Callable[[Any, Tensor, str], None]
    convert: Callable[[Any, Tensor, Dict[str, Any]], Any]
    required: bool = False


def _check_tensor_like_param(value: Any, param: Tensor, where: str) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(f"{where} is a meta tensor (no data): the checkpoint holds no values for it")
    if value.is_sparse or value.layout != torch.strided:
        raise ValueError(f"{where} has layout {value.layout}; expected a dense tensor")
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{where} has shape {tuple(value.shape)}, the parameter has {tuple(param.shape)}")
    if param.is_complex() != value.is_complex() or not (value.is_floating_point() or value.is_complex()):
        kind = "complex" if param.is_complex() else "floating-point"
        raise ValueError(f"{where} has dtype {value.dtype}; a {param.dtype} parameter needs {kind} states")


def _check_finite_moment(value: Any, param: Tensor, where: str) -> None:
    _check_tensor_like_param(value, param, where)
    # A load-time read of the values (a host sync on a GPU, once): a NaN or
    # Inf moment can never step again, so it is refused rather than resumed.
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{where} holds NaN or Inf values (a diverged run?)")


def _check_second_moment(value: Any, param: Tensor, where: str) -> None:
    _check_finite_moment(value, param, where)
    # Complex parameters are stepped as their real view: both parts of exp_avg_sq are second moments.
    if bool(((torch.view_as_real(value) if value.is_complex() else value) < 0).any()):
        raise ValueError(f"{where} holds negative values; a second moment (squared gradients) cannot")


def _relayout(value: Tensor, param: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` on the parameter's device, in ``dtype`` and the parameter's memory layout (the fused
    kernels take states with the parameter's strides)."""
    if is_dtensor(value) or is_dtensor(param):
        return value.to(device=param.device, dtype=dtype)
    out = torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format)
    if out.stride() == value.stride() and value.device == param.device and value.dtype == dtype:
        return value
    return out.copy_(value)


def _convert_moment(value: Tensor, param: Tensor, group: Dict[str, Any]) -> Tensor:
    return _relayout(value, param, default_state_dtype(param, group.get("state_dtype")))


def _convert_pre_grad(value: Tensor, param: Tensor, group: Dict[str, Any]) -> Tensor:
    # mmpretrain's Adan keeps the previous gradient itself; ours keeps its negation.
    return _convert_moment(value, param, group).neg()


def _check_step_entry(value: Any, param: Tensor, where: str) -> None:
    check_step_value(value, where)


def _convert_step_entry(value: Any, param: Tensor, group: Dict[str, Any]) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(device=param.device, dtype=torch.float32).reshape(()).clone()
    return torch.full((), float(value), dtype=torch.float32, device=param.device)


STATE_ENTRIES: Dict[str, StateEntry] = {
    "exp_avg": StateEntry(_check_finite_moment, _convert_moment, required=True),
    "exp_avg_sq": StateEntry(_check_second_moment, _convert_moment, required=True),
    "exp_avg_diff": StateEntry(_check_finite_moment, _convert_moment, required=True),
    "neg_pre_grad": StateEntry(_check_finite_moment, _convert_moment),
    "pre_grad": StateEntry(_check_finite_moment, _convert_pre_grad),
    "step": StateEntry(_check_step_entry, _convert_step_entry),
}
# Keys stored under another name once loaded.
_RENAMED = {"pre_grad": "neg_pre_grad"}


def register_state_entry(key: str, entry: StateEntry, installed_as: Optional[str] = None) -> None:
    """Teach ``load_state_dict`` a new per-parameter state key (e.g. a quantized moment and its scales)."""
    STATE_ENTRIES[key] = entry
    if installed_as is not None:
        _RENAMED[key] = installed_as


@dataclass(frozen=True)
class StateHook:
    """A check and conversion of one parameter's whole state, for entries that only make sense together.

    ``keys``: the state keys it adds to those :data:`STATE_ENTRIES` knows;
    ``claims(st)``: the keys of a saved state it checks and converts itself
    (the table skips them; they reach ``adapt`` as saved);
    ``check(st, param, where)`` raises ``ValueError``, before any conversion;
    ``adapt(out, st, param, group)`` returns the state to install from the
    converted one ``out`` (a new dict; never changes ``st`` or its tensors);
    ``unsave(st, where)``, first of all, the saved state with the keys that
    ``state_dict()`` renames back under their in-memory names (a new dict, or
    ``st`` itself when nothing is renamed; raises ``ValueError``).
    """
    keys: Tuple[str, ...]
    claims: Callable[[Dict[str, Any]], Sequence[str]]
    check: Callable[[Dict[str, Any], Tensor, str], None]
    adapt: Callable[[Dict[str, Any], Dict[str, Any], Tensor, Dict[str, Any]], Dict[str, Any]]
    unsave: Callable[[Dict[str, Any], str], Dict[str, Any]] = lambda st, where: st


STATE_HOOKS: List[StateHook] = []


def register_state_hook(hook: StateHook) -> None:
    """Teach ``load_state_dict`` a kind of state whose entries are checked and converted together."""
    if hook not in STATE_HOOKS:
        STATE_HOOKS.append(hook)


def check_step_value(value: Any, where: str) -> float:
    """A step count: an int, an integral float or a one-element real tensor, finite and >= 0."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.device.type == "meta" or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{where} must be a number or a one-element real tensor with a value, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}")
        x = float(value.reshape(()))
    elif _is_real_number(value):
        x = float(value)
    else:
        raise ValueError(f"{where} must be a non-negative whole number, got {value!r}")
    if not (math.isfinite(x) and x >= 0 and x == int(x)):
        raise ValueError(f"{where} must be a non-negative whole number, got {x!r}")
    return x


def prepare_param_state(st: Any, param: Tensor, group: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Check one parameter's saved state and return it converted for ``param`` (a new dict)."""
    if not isinstance(st, dict):
        raise ValueError(f"{where} must be a dict, got {type(st).__name__}")
    if not st:
        return {}
    for hook in STATE_HOOKS:
        st = hook.unsave(st, where)
    known = set(STATE_ENTRIES).union(*(h.keys for h in STATE_HOOKS))
    unknown = [k for k in st if k not in known]
    if unknown:
        raise ValueError(f"{where} holds {sorted(map(str, unknown))}, which Adan does not keep (known: "
                         f"{sorted(known)}): is this another optimizer's checkpoint?")
    missing = [k for k, e in STATE_ENTRIES.items() if e.required and k not in st]
    if missing:
        raise ValueError(f"{where} lacks {missing}: the checkpoint is truncated")
    claimed = set().union(*(hook.claims(st) for hook in STATE_HOOKS))
    for key, value in st.items():
        if key not in claimed and key in STATE_ENTRIES:
            STATE_ENTRIES[key].check(value, param, f"{where}['{key}']")
    for hook in STATE_HOOKS:
        hook.check(st, param, where)
    stray = [k for k in st if k not in claimed and k not in STATE_ENTRIES]
    if stray:  # a hook's key that no hook took for this state
        raise ValueError(f"{where} holds {stray}, which do not belong with the rest of this state")
    out: Dict[str, Any] = {}
    for key, value in st.items():
        name = _RENAMED.get(key, key)
        if name != key and name in st:
            continue  # both forms saved (convert_state_dict's mmpretrain target): keep ours
        out[name] = value if key in claimed else STATE_ENTRIES[key].convert(value, param, group)
    for hook in STATE_HOOKS:
        out = hook.adapt(out, st, param, group)
    return out


def _group_where(gi: int) -> str:
    return f"Adan.load_state_dict: param_groups[{gi}]"


def prepare_state_dict(state_dict: Any, groups: List[Dict[str, Any]],
                       check_honourable: Callable[[Dict[str, Any]], None]) -> Tuple[List[Dict[str, Any]], Dict]:
    """Check a whole optimizer state_dict against the current ``groups``.

    Returns the new ``param_groups`` and ``state`` (keyed by parameter) to
    install; raises ``ValueError`` naming the first problem otherwise.  The
    rule: hyper-parameters come from the checkpoint (a key it lacks keeps the
    current group's value), execution choices (:data:`IMPL_KEYS`) from the
    current groups; ``check_honourable(group)`` refuses what this optimizer
    cannot run.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("Adan.load_state_dict: expected a dict with 'state' and 'param_groups' "
                         f"(an optimizer state_dict), got {type(state_dict).__name__}"
                         + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else ""))
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, dict) for g in saved_groups):
        raise ValueError("Adan.load_state_dict: 'param_groups' must be a list of dicts")
    if not isinstance(saved_state, dict):
        raise ValueError(f"Adan.load_state_dict: 'state' must be a dict, got {type(saved_state).__name__}")
    if len(saved_groups) != len(groups):
        raise ValueError(f"Adan.load_state_dict: the checkpoint has {len(saved_groups)} parameter groups, "
                         f"this optimizer has {len(groups)}")
    index_to_param: Dict[Any, Tensor] = {}
    index_to_group: Dict[Any, int] = {}
    new_groups = []
    for gi, (saved, ours) in enumerate(zip(saved_groups, groups)):
        where = _group_where(gi)
        ids = saved.get("params")
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"{where} has no 'params' list")
        if len(ids) != len(ours["params"]):
            raise ValueError(f"Adan.load_state_dict: group {gi} has {len(ids)} parameters in "
                             f"the checkpoint and {len(ours['params'])} here")
        for index, p in zip(ids, ours["params"]):
            if not isinstance(index, (int, str)) or isinstance(index, bool) or index in index_to_param:
                raise ValueError(f"{where} lists parameter id {index!r} more than once or as a non-integer")
            index_to_param[index] = p
            index_to_group[index] = gi
        missing = [k for k in REQUIRED_HPARAMS if k not in saved]
        if missing:
            raise ValueError(f"{where} lacks {missing}: not an Adan checkpoint (or a truncated one)")
        new = {k: v for k, v in saved.items() if k not in ("params",) + IMPL_KEYS}
        for key in OPTIONAL_HPARAMS:
            new.setdefault(key, ours[key])
        for key in IMPL_KEYS:
            new[key] = ours[key]
        new["params"] = ours["params"]
        if "param_names" in ours and "param_names" not in saved:
            new["param_names"] = ours["param_names"]
        try:
            check_group(new)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if "step" in new:
            check_step_value(new["step"], f"{where}['step']")
        try:
            check_honourable(new)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{where}: this optimizer cannot honour the checkpoint's options: {err}") from None
        new_groups.append(new)
    check_same_global_options(new_groups, ".load_state_dict")

    new_state: Dict[Tensor, Dict[str, Any]] = {}
    for index, st in saved_state.items():
        if index not in index_to_param:
            raise ValueError(f"Adan.load_state_dict: state for parameter id {index!r}, "
                             "which no parameter group lists")
        gi = index_to_group[index]
        param = index_to_param[index]
        where = f"Adan.load_state_dict: the state of parameter {index!r}"
        converted = prepare_param_state(st, param, new_groups[gi], where)
        if converted and "step" not in new_groups[gi]:
            raise ValueError(f"{where} has moments but its group ({gi}) has no 'step' count")
        if converted:
            new_state[param] = converted
    for group in new_groups:
        if isinstance(group.get("step"), Tensor):
            home = group["params"][0].device if group["params"] else torch.device("cpu")
            group["step"] = group["step"].detach().to(device=home, dtype=torch.float32).reshape(()).clone()
        elif "step" in group:
            group["step"] = int(group["step"])
    return new_groups, new_state
