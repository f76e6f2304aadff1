"""``Adan``: the optimizer class.  It owns parameter groups and state; the
math lives in :mod:`adan_plugin.functional`."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import _ext
from .clip import clip_coefficient, grad_sq_norm
from .distributed import (any_sharded, check_grad_layout, check_groups_picklable, check_process_group_spec,
                          local_tensors, resolve_process_group)
from .functional import MOMENT_KEYS, STATE_KEYS, _multi_tensor_adan, _single_tensor_adan
from .fused import fused_group_step
from . import lowmem

_STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, lowmem.EIGHT_BIT)
# Group keys that choose an execution path; load_state_dict keeps the current ones.
_IMPL_KEYS = ("foreach", "fused", "state_dtype", "capturable", "fused_backend", "kahan_sum")
# Options that only the fused kernels implement (their "off" values are None/False).
_FUSED_ONLY = ("state_dtype", "capturable", "skip_nonfinite", "fused_backend")
# Options that act on all groups together, so they are set once per optimizer.
_GLOBAL_KEYS = ("max_grad_norm", "skip_nonfinite")



def _check_hparams(group: Dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyper-parameter."""
    for name in ("lr", "eps", "weight_decay", "max_grad_norm"):
        value = group[name]
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"Adan: {name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
            continue
        if not isinstance(value, (int, float)) or not value >= 0.0 or value == float("inf"):
            raise ValueError(f"Adan: invalid {name}={value!r}; it must be a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 3:
        raise ValueError(f"Adan: betas must be a tuple of three floats (beta1, beta2, beta3), got {betas!r}")
    for i, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Adan: invalid betas[{i}]={beta!r}; each beta must lie in [0, 1)")


def _triton_lacks(group: Dict[str, Any]) -> List[str]:
    """The options enabled in ``group`` that the Triton kernels do not implement."""
    lacks = [k for k in ("caution", "kahan_sum") if group.get(k)]
    return lacks + (["state_dtype='8bit'"] if group.get("state_dtype") == "8bit" else [])


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers its storage span without gaps or overlaps (any dim order)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class Adan(Optimizer):
    r"""Adan: Adaptive Nesterov Momentum (Xie et al., arXiv 2208.06677), Algorithm 1.

    With g the (clipped) gradient, diff = g - g_prev (0 on a parameter's first
    step) and k the group's step count::

        m <- b1*m + (1-b1)*g
        d <- b2*d + (1-b2)*diff
        n <- b3*n + (1-b3)*(g + b2*diff)**2
        denom = sqrt(n)/sqrt(1-b3**k) + eps
        theta <- theta - lr/(1-b1**k) * m/denom - lr*b2/(1-b2**k) * d/denom
        theta <- theta / (1 + lr*wd)          (no_prox=False, the paper's proximal step)
        theta <- theta * (1 - lr*wd) first    (no_prox=True, decoupled decay as in AdamW)

    ``betas`` follow the code convention of the official, timm and mmpretrain
    implementations: they are the paper's ``1 - beta`` values.  The keyword
    names are a superset of those three implementations, and the state keys
    (``exp_avg``, ``exp_avg_sq``, ``exp_avg_diff``, ``neg_pre_grad`` and
    ``group['step']``) are theirs, so checkpoints move between them.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.  Adan's peak lr is usually 5-10x AdamW's for vision.
        betas: (beta1, beta2, beta3) in the code convention.
        eps: added to the denominator.
        weight_decay: decoupled weight decay.
        max_grad_norm: when > 0, every gradient is scaled by
            ``min(1, max_grad_norm / (||g|| + eps))`` with ``||g||`` the L2 norm
            over all gradients of all groups.  Computed on the device; ``p.grad``
            is never modified.
        no_prox: apply weight decay AdamW-style instead of the proximal step.
        caution: timm's "Cautious Optimizers" masking of the momentum term.
        foreach: use the ``torch._foreach_*`` path; ``None`` picks the faster
            path for the device (single-tensor on CPU, foreach on GPU).
        fused: use the fused kernels (compiled, or Triton's on a GPU; see
            ``fused_backend``); ``None`` uses them when available for the
            parameters' device.
        clip_process_group: for sharded optimizers (torch's
            ``ZeroRedundancyOptimizer``), where this optimizer holds only this
            rank's share of the model: ``'world'``, a group's name
            (``group.group_name``; under ZeRO, whose state_dict holds this
            keyword, a ProcessGroup object would not pickle) or a ProcessGroup
            makes the ``max_grad_norm`` norm global, an all-reduce (sum) of the
            squared norm over that group, on the device.  ``None`` (default): the norm
            of the gradients this optimizer holds.  Not needed for DDP (every
            rank holds every gradient) nor FSDP2 (DTensor gradients are reduced
            over their own mesh).  Every rank of the group must call ``step()``.
        state_dtype: dtype of the four state tensors on the fused path
            (``torch.bfloat16`` halves Adan's state memory for fp32
            parameters); ``None``: the parameter's dtype.  Math stays fp32.
            ``"8bit"``: one byte per element plus an fp32 scale per block of
            256 (4.06 B per parameter instead of 16) for parameters of at
            least 4096 elements, fp32 states for smaller ones; the maps are
            described in :mod:`adan_plugin.lowmem`.
        kahan_sum: for bfloat16/float16 parameters, keep a compensation
            buffer of the parameter's dtype (``state['kahan_comp']``) that
            carries each update's rounding error, so updates below half a
            16-bit ulp are not lost (pure-bf16 training).  Every path.  No
            effect, and no buffer, for fp32 parameters.
        capturable: fused path only: keep the step count on the device so
            ``step()`` can be captured in a CUDA graph (see ``adan_plugin.fused``).
        fused_backend: force one fused backend: ``"cpu"``/``"cuda"`` (the
            compiled kernels) or ``"triton"`` (``adan_plugin.triton_adan``; CPU
            tensors only under ``TRITON_INTERPRET=1``, a test facility).
            ``None``: the compiled kernels when built for the device, else the
            Triton ones on a GPU.  ``opt.fused_backends`` says what each group runs.
        skip_nonfinite: fused path only: when any gradient holds NaN or Inf,
            skip the whole step on the device (parameters, states and step
            count untouched), as GradScaler does for an overflow, and count it
            in ``opt.skipped_steps`` (a device tensor; read it when you log).
            Without it, as in ``torch.optim``, a non-finite gradient reaches the
            parameters; checking on the host would cost a sync per step.

    With the fused kernels ``torch.amp.GradScaler.step()`` hands the loss
    scale and ``found_inf`` to ``step()`` (``_step_supports_amp_scaling``):
    gradients are unscaled in registers and an overflowing step is skipped on
    the device, step count included.  The fused path does not implement
    ``caution``: ``fused=None`` then picks an unfused path, ``fused=True``
    raises ``ValueError``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        no_prox: bool = False,
        caution: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        clip_process_group=None,
        state_dtype: Optional[torch.dtype] = None,
        capturable: bool = False,
        skip_nonfinite: bool = False,
        fused_backend: Optional[str] = None,
        kahan_sum: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, no_prox=no_prox,
            caution=caution, foreach=foreach, fused=fused, state_dtype=state_dtype, capturable=capturable,
            skip_nonfinite=skip_nonfinite, fused_backend=fused_backend, kahan_sum=kahan_sum,
        )
        _check_hparams(defaults)
        if fused and foreach:
            raise ValueError("Adan: fused=True and foreach=True are mutually exclusive")
        check_process_group_spec(clip_process_group)
        # An attribute, not a group key: a ProcessGroup cannot go into a
        # state_dict, and the norm spans all groups anyway.
        self.clip_process_group = clip_process_group
        self.skipped_steps: Optional[Tensor] = None
        if not isinstance(params, Tensor):  # a lone tensor gets torch's own TypeError below
            params = list(params)
            check_groups_picklable([g for g in params if isinstance(g, dict)])
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hparams(group)
            for key in _GLOBAL_KEYS:
                if group[key] != self.defaults[key]:
                    raise ValueError(
                        f"Adan: {key} acts on the gradients of all groups together, so it is set once "
                        f"for the optimizer (got {group[key]!r} in a group, "
                        f"{self.defaults[key]!r} for the optimizer)")
            self._check_fused_options(group)
            if self._needs_fused(group):
                self._check_fused_possible(group)
        except Exception:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_fused_options(group: Dict[str, Any]) -> None:
        """Options only the fused kernels implement, and the one they do not."""
        if not isinstance(group["kahan_sum"], bool):
            raise ValueError(f"Adan: kahan_sum must be True or False, got {group['kahan_sum']!r}")
        if not any(group["state_dtype"] is d or group["state_dtype"] == d for d in _STATE_DTYPES):
            raise ValueError(f"Adan: state_dtype must be one of {_STATE_DTYPES}, got {group['state_dtype']!r}")
        if group["fused_backend"] not in (None,) + _ext.FUSED_BACKENDS:
            raise ValueError(f"Adan: fused_backend must be None or one of {_ext.FUSED_BACKENDS}, "
                             f"got {group['fused_backend']!r}")
        lacks = _triton_lacks(group)
        if group["fused_backend"] == "triton" and lacks:
            raise ValueError(f"Adan: fused_backend='triton': the Triton kernels do not implement "
                             f"{', '.join(lacks)}; use fused_backend=None or 'cuda'")
        fused_only = [k for k in _FUSED_ONLY if group[k] not in (None, False)]
        for key, value in (("fused", False), ("foreach", True)):
            if fused_only and group[key] is value:
                raise ValueError(f"Adan: {', '.join(fused_only)} need the fused kernels; they cannot be "
                                 f"combined with {key}={value}")
        if (group["fused"] or fused_only) and group["caution"]:
            raise ValueError("Adan: the fused kernels do not implement caution=True (its per-tensor "
                             "mask mean needs a second pass); use fused=None or fused=False")

    @staticmethod
    def _needs_fused(group: Dict[str, Any]) -> bool:
        return bool(group["fused"]) or (group["fused"] is None and any(
            group[k] not in (None, False) for k in _FUSED_ONLY))

    def _uses_fused(self, group: Dict[str, Any]) -> bool:
        """Whether ``group`` steps with the fused kernels (decided on all its parameters)."""
        if group["fused"] is not None:
            return bool(group["fused"])
        if self._needs_fused(group):  # a fused-only option: fused or a clear error
            return True
        if group["foreach"] or group["caution"]:
            return False
        # The kernels take dense parameters only; a group holding a strided
        # view (timm's optimizer tests use one) steps on an unfused path.
        return all(_is_dense(p) for p in group["params"]) and all(
            _ext.select_fused_backend(device, None, _triton_lacks(group))[0] is not None
            for device in {p.device for p in group["params"]})

    @property
    def fused_backends(self) -> Tuple[Optional[str], ...]:
        """Per group, the fused backend its step runs (``'cpu'``, ``'cuda'``, ``'triton'``; ``'cpu+triton'``
        for a group spanning devices of two backends), or ``None`` for an unfused path."""
        out = []
        for group in self.param_groups:
            names = set()
            if self._uses_fused(group):
                for device in {p.device for p in group["params"]}:
                    names.add(_ext.select_fused_backend(device, group["fused_backend"], _triton_lacks(group))[0])
            out.append("+".join(sorted(str(n) for n in names)) if names else None)
        return tuple(out)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler.step() then hands grad_scale/found_inf to step() instead
        # of unscaling the gradients and syncing on found_inf itself.
        return all(self._uses_fused(group) for group in self.param_groups)

    def _check_fused_possible(self, group: Dict[str, Any]) -> None:
        for device in {p.device for p in group["params"]}:
            backend, why = _ext.select_fused_backend(device, group["fused_backend"], _triton_lacks(group))
            if backend is None:
                raise RuntimeError(f"Adan(fused=True): no fused backend for parameters on {device}: {why}")

    def __getstate__(self) -> Dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and groups; losing
        # the group would silently turn a global clip into a local one.
        return {**super().__getstate__(), "clip_process_group": self.clip_process_group}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("clip_process_group", None)
        self.__dict__.setdefault("skipped_steps", None)
        for group in self.param_groups:
            for key in ("max_grad_norm", "no_prox", "caution", "foreach", "fused", "kahan_sum") + _FUSED_ONLY:
                group.setdefault(key, self.defaults.get(key))
        # mmpretrain's Adan keeps the previous gradient itself ('pre_grad');
        # ours, like the official and timm versions, keeps its negation.
        for st in self.state.values():
            if "pre_grad" in st and "neg_pre_grad" not in st:
                st["neg_pre_grad"] = st.pop("pre_grad").neg()

    # ------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint from this class, the official, timm's or mmpretrain's Adan.

        The checkpoint is checked completely before anything is changed, so a
        truncated or mismatched one raises ``ValueError`` and leaves the
        optimizer as it was.
        """
        index_to_param = self._validate_state_dict(state_dict)
        # How to run is this optimizer's choice, not the checkpoint's: a
        # checkpoint from a fused run must load where the kernels are absent.
        impl = [{k: g.get(k) for k in _IMPL_KEYS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keep in zip(self.param_groups, impl):
            group.update(keep)
        saved = {index_to_param[i]: st for i, st in state_dict["state"].items()}
        # torch casts every state tensor to its parameter's dtype on load;
        # reduced-precision states (state_dtype) go back to their dtype, and
        # 8-bit ones are rebuilt from the checkpoint's own tensors.
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self.state[p] = lowmem.adapt_loaded_state(
                        self.state[p], saved.get(p, {}), p, group.get("state_dtype"), group.get("kahan_sum"))

    def _validate_state_dict(self, state_dict: Dict[str, Any]) -> Dict[Any, Tensor]:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("Adan.load_state_dict: expected a dict with 'state' and 'param_groups' "
                             f"(an optimizer state_dict), got {type(state_dict).__name__}"
                             + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, dict) else ""))
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"Adan.load_state_dict: the checkpoint has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        index_to_param = {}
        for gi, (saved, ours) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(f"Adan.load_state_dict: group {gi} has {len(saved['params'])} parameters in "
                                 f"the checkpoint and {len(ours['params'])} here")
            merged = {**self.defaults, **{k: v for k, v in saved.items() if k != "params"}}
            _check_hparams(merged)
            index_to_param.update(zip(saved["params"], ours["params"]))
        for index, st in state_dict["state"].items():
            if index not in index_to_param:
                raise ValueError(f"Adan.load_state_dict: state for parameter id {index!r}, "
                                 "which no parameter group lists")
            param = index_to_param[index]
            missing = [k for k in MOMENT_KEYS if k not in st]
            if missing:
                raise ValueError(f"Adan.load_state_dict: the checkpoint is truncated: the state of parameter "
                                 f"{index!r} lacks {missing}")
            for key in STATE_KEYS + ("pre_grad", lowmem.KAHAN_KEY):
                value = st.get(key)
                if value is not None and tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"Adan.load_state_dict: state '{key}' of parameter {index!r} has shape "
                                     f"{tuple(value.shape)}, the parameter has {tuple(param.shape)}")
            problem = lowmem.check_saved_state(st, param)
            if problem:
                raise ValueError(f"Adan.load_state_dict: parameter {index!r}: {problem}")
        return index_to_param

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def restart_opt(self) -> None:
        """Restart strategy (paper, Table 12): zero the moments and the step count.

        The next step then treats every gradient as a first gradient.
        """
        for group in self.param_groups:
            if isinstance(group.get("step"), Tensor):
                group["step"].zero_()  # in place: a captured CUDA graph keeps reading it
            else:
                group["step"] = 0
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    for key in MOMENT_KEYS:
                        state[key].zero_()

    def _gather(self, group: Dict[str, Any]) -> Tuple[List[Tensor], List[Tensor]]:
        """Params with grads and their grads; raises before anything changes."""
        params, grads = [], []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("Adan does not support sparse gradients; use a dense embedding "
                                   "(sparse=False) or torch.optim.SparseAdam for that parameter")
            if g.device != p.device:
                raise RuntimeError(f"Adan: a gradient on {g.device} belongs to a parameter on {p.device}")
            if g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(f"Adan: gradient {g.dtype}{tuple(g.shape)} does not match its parameter "
                                   f"{p.dtype}{tuple(p.shape)}")
            check_grad_layout(p, g)
            params.append(p)
            grads.append(g)
        return params, grads

    def _resolve_impl(self, group: Dict[str, Any], params: List[Tensor]) -> Callable:
        if group["foreach"] is None:
            foreach = all(p.device.type != "cpu" for p in params)
        else:
            foreach = group["foreach"]
        return _multi_tensor_adan if foreach else _single_tensor_adan

    def _init_state(self, group: Dict[str, Any], params: List[Tensor], grads: List[Tensor],
                    grad_coef: Optional[Tensor]):
        m, n, d, neg, comps = [], [], [], [], []
        first_step = group["step"] == 1
        for p, g in zip(params, grads):
            state = self.state[p]
            if len(state) == 0:
                for key in MOMENT_KEYS:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if first_step or "neg_pre_grad" not in state:
                # A parameter's first gradient has no predecessor: seeding
                # -g makes the difference zero, as Algorithm 1 specifies.
                state["neg_pre_grad"] = g.neg() if grad_coef is None else (g * grad_coef).neg_()
            m.append(state["exp_avg"])
            n.append(state["exp_avg_sq"])
            d.append(state["exp_avg_diff"])
            neg.append(state["neg_pre_grad"])
            comps.append(lowmem.kahan_buffer(state, p, group["kahan_sum"]))
        return m, n, d, neg, comps

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        gathered = [self._gather(group) for group in self.param_groups]
        # Set by torch.amp.GradScaler.step() when _step_supports_amp_scaling:
        # device tensors, never read here.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grad_coef = None
        clip, skip = self.defaults["max_grad_norm"] > 0, self.defaults.get("skip_nonfinite")
        if clip or skip:
            all_grads = [g for _, grads in gathered for g in grads]
            clip_group = resolve_process_group(self.clip_process_group)
            # Under a sharded optimizer every rank joins the all-reduce, also one without gradients.
            if all_grads or clip_group is not None:
                sq_norm = grad_sq_norm(all_grads, process_group=clip_group)
                if grad_scale is not None:
                    # Clip the unscaled gradients: ||g / s||^2 = ||g||^2 / s^2.
                    sq_norm = sq_norm / grad_scale.to(sq_norm.device, torch.float32, non_blocking=True).square()
                if clip:
                    grad_coef = clip_coefficient(sq_norm, self.defaults["max_grad_norm"], self.defaults["eps"])
                if skip:
                    # A NaN or Inf anywhere makes the squared norm non-finite:
                    # skip the step the way GradScaler's found_inf does.
                    nonfinite = (~torch.isfinite(sq_norm)).to(torch.float32)
                    if self.skipped_steps is None:
                        self.skipped_steps = torch.zeros((), dtype=torch.float32, device=sq_norm.device)
                    self.skipped_steps.add_(nonfinite)
                    found_inf = nonfinite if found_inf is None else torch.maximum(
                        found_inf.to(nonfinite.device, torch.float32, non_blocking=True), nonfinite)

        for group, (params, grads) in zip(self.param_groups, gathered):
            if self._uses_fused(group):
                fused_group_step(self, group, params, grads, grad_coef, grad_scale, found_inf)
                continue
            # Like the official, timm and mmpretrain versions, the step count
            # advances for every group, with or without gradients.
            group["step"] = int(group.get("step", 0)) + 1
            if not params:
                continue
            m, n, d, neg, comps = self._init_state(group, params, grads, grad_coef)
            beta1, beta2, beta3 = group["betas"]
            impl = self._resolve_impl(group, params)
            if group["caution"] and any_sharded(params):
                # Caution rescales its mask by the mean over the whole parameter:
                # DTensor ops compute it across shards (an all-reduce per parameter).
                impl = _single_tensor_adan
            else:
                # The rest of the update is elementwise, so each rank updates its
                # own shards; they share storage with the DTensors (FSDP2).
                params, grads, m, n, d, neg = local_tensors(params, grads, m, n, d, neg)
                comps = [None if c is None else local_tensors([c])[0][0] for c in comps]
            impl(
                params, grads, m, n, d, neg,
                step=group["step"], lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3,
                eps=group["eps"], weight_decay=group["weight_decay"], no_prox=group["no_prox"],
                caution=group["caution"], grad_coef=grad_coef,
                kahan_comps=comps if any(c is not None for c in comps) else None,
            )
        return loss


class FusedAdan(Adan):
    """:class:`Adan` with ``fused=True``: the compiled kernels, or a clear error."""

    def __init__(self, params: Iterable, *args, **kwargs):
        kwargs.setdefault("fused", True)
        super().__init__(params, *args, **kwargs)
