"""``Adan``: the optimizer class.  It owns parameter groups and state; the
math lives in :mod:`adan_plugin.functional`."""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import _ext
from .clip import clip_coefficient, grad_sq_norm
from .distributed import (any_sharded, check_grad_layout, check_groups_picklable, check_process_group_spec,
                          local_tensors, resolve_process_group)
from . import lowmem
from .functional import MOMENT_KEYS, STATE_KEYS, _multi_tensor_adan, _single_tensor_adan  # noqa: F401 (STATE_KEYS re-exported)
from .fused import FUSED_DTYPES, fused_group_step
from .validation import (GLOBAL_KEYS, check_group, default_state_dtype, host_float, prepare_state_dict,
                         step_hyperparameters)

# Options that only the fused kernels implement (their "off" values are None/False).
_FUSED_ONLY = ("state_dtype", "capturable", "skip_nonfinite", "fused_backend")
_FUSED_REFUSAL = "`fused=True` requires all the params to be floating point Tensors of supported devices"


def _triton_lacks(group: Dict[str, Any]) -> List[str]:
    """The options enabled in ``group`` that the Triton kernels do not implement (8-bit states and
    ``kahan_sum`` they do; ``caution`` no fused kernel does)."""
    return ["caution"] if group.get("caution") else []


def _select_backend(device: torch.device, group: Dict[str, Any], requested: Optional[str]) -> Tuple[Optional[str], str]:
    """``_ext.select_fused_backend`` for ``group``'s parameters on ``device``."""
    return _ext.select_fused_backend(device, requested, _triton_lacks(group), group["state_dtype"])


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers its storage span without gaps or overlaps (any dim order)."""
    if t.is_contiguous() and t.numel():  # the usual case, without the sort (torch calls any empty tensor contiguous)
        return True
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
            ``lr``, ``eps``, ``weight_decay``, ``max_grad_norm`` and the betas
            may be one-element tensors; they are checked when set (constructor,
            ``add_param_group``, ``load_state_dict``) and, when CPU tensors (the
            usual case: schedulers change them in place), again at every
            ``step()`` without a device sync.  A CUDA tensor is only checked when
            set, and ``step()`` reads it on the host: keep lr a float or a CPU tensor.
        betas: (beta1, beta2, beta3) in the code convention.
        eps: added to the denominator.
        weight_decay: decoupled weight decay.
        max_grad_norm: when > 0, every gradient is scaled by
            ``min(1, max_grad_norm / (||g|| + eps))`` with ``||g||`` the L2 norm
            over all gradients of all groups.  Computed on the device; ``p.grad``
            is never modified.  Optimizer-wide, like ``skip_nonfinite``: every
            group holds the same value (a group that does not name it inherits it).
        no_prox: apply weight decay AdamW-style instead of the proximal step.
        caution: timm's "Cautious Optimizers" masking of the momentum term.
        foreach: ``True``: the ``torch._foreach_*`` path; ``False``: the
            single-tensor path (as in ``torch.optim``; an explicit value is not
            fused unless ``fused=True`` or an option only the fused kernels
            implement, e.g. ``state_dtype``, asks for them; ``foreach=True`` is
            then refused, as torch refuses it with ``fused=True``); ``None`` lets ``fused`` decide, else
            the faster unfused path for the device (single-tensor on CPU,
            foreach on GPU).
        fused: use the fused kernels (compiled, or Triton's on a GPU; see
            ``fused_backend``) for float32/bfloat16/float16/complex64 dense
            parameters; parameters on meta may be given, as for torch's fused
            optimizers, but a step on them is refused.  ``None`` uses them when
            available for the parameters' device and every parameter of the
            group is supported, else an unfused path (e.g. for float64).
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
            parameters); ``None``: the parameter's dtype, except fp32 for fp16
            parameters (on every path).  ``torch.float16`` is refused:
            ``exp_avg_sq`` would overflow for gradients above ~256.  Math is
            fp32 for 16-bit parameters on every path.
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
            compiled kernels) or ``"triton"`` (``adan_plugin.triton_adan``, 8-bit
            states and ``kahan_sum`` included; CPU tensors only under
            ``TRITON_INTERPRET=1``, a test facility; verified in Triton's
            interpreter and on an H100).  ``None``: the compiled kernels when
            built for the device, else the Triton ones on a GPU; for
            ``state_dtype="8bit"`` on a GPU, Triton first (measured 1.4x faster
            than the CUDA kernel's 8-bit code on an H100).
            ``opt.fused_backends`` says what each group runs.
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

    Every input is checked before anything changes: the constructor and
    ``add_param_group`` raise ``ValueError`` naming a bad option, and
    ``step()`` checks all groups (hyper-parameters, gradients, what the
    fused kernels take) before its first write, so a refused step leaves
    parameters, states and step counts as they were.  Gradients may have any
    layout (a channels_last gradient of a contiguous parameter is copied into
    the parameter's layout on the fused path).  For checkpoints see
    :meth:`load_state_dict`.
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
        check_group(defaults)
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
        if isinstance(param_group, dict) and self.param_groups:
            # Optimizer-wide options: a new group inherits the current value
            # (which may come from a checkpoint), not the constructor's.
            param_group = {**{k: self.param_groups[0][k] for k in GLOBAL_KEYS}, **param_group}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group)
            for key in GLOBAL_KEYS:
                first = self.param_groups[0][key]
                if group[key] != first:
                    raise ValueError(
                        f"Adan: {key} acts on the gradients of all groups together, so it is set once "
                        f"for the optimizer (got {group[key]!r} in a group, "
                        f"{first!r} for the optimizer)")
            self._check_fused_options(group)
            if self._needs_fused(group):
                self._check_fused_possible(group)
        except Exception:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_fused_options(group: Dict[str, Any]) -> None:
        """Options only the fused kernels implement, and the one they do not."""
        if group["fused_backend"] not in (None,) + _ext.FUSED_BACKENDS:
            raise ValueError(f"Adan: fused_backend must be None or one of {_ext.FUSED_BACKENDS}, "
                             f"got {group['fused_backend']!r}")
        lacks = _triton_lacks(group)
        if group["fused_backend"] == "triton" and lacks:
            raise ValueError(f"Adan: fused_backend='triton': the Triton kernels do not implement "
                             f"{', '.join(lacks)}")
        fused_only = [k for k in _FUSED_ONLY if group[k] not in (None, False)]
        asks = f"{', '.join(fused_only)} {'needs' if len(fused_only) == 1 else 'need'}"
        for key, value in (("fused", False), ("foreach", True)):
            if fused_only and group[key] is value:
                raise ValueError(f"Adan: {asks} the fused kernels; they cannot be combined with {key}={value}")
        if (group["fused"] or fused_only) and group["caution"]:
            fix = f"{asks} them" if fused_only else "use fused=None or fused=False"
            raise ValueError("Adan: the fused kernels do not implement caution=True (its per-tensor "
                             f"mask mean needs a second pass); {fix}")

    def _check_honourable(self, group: Dict[str, Any]) -> None:
        """What ``group`` asks for (a checkpoint's options) can run with this optimizer's choices."""
        self._check_fused_options(group)
        if self._needs_fused(group):
            self._check_fused_possible(group)

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
        if group["foreach"] is not None or group["caution"]:
            return False  # an explicit foreach=False/True names an unfused path, as in torch
        # The kernels take dense fp32/bf16/fp16 parameters only; any other
        # group (float64, a strided view as in timm's tests) steps unfused.
        if not all(p.dtype in FUSED_DTYPES and _is_dense(p) for p in group["params"]):
            return False
        return all(_select_backend(device, group, None)[0] is not None
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
                    names.add(_select_backend(device, group, group["fused_backend"])[0])
            out.append("+".join(sorted(str(n) for n in names)) if names else None)
        return tuple(out)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler.step() then hands grad_scale/found_inf to step() instead
        # of unscaling the gradients and syncing on found_inf itself.
        return all(self._uses_fused(group) for group in self.param_groups)

    def _check_fused_possible(self, group: Dict[str, Any]) -> None:
        # Meta parameters are allowed here (build on meta, to_empty(), then
        # step), as torch's fused optimizers allow; step() checks again.
        self._check_fused_params(group["params"], group, allow_meta=True)

    @staticmethod
    def _check_fused_params(params: List[Tensor], group: Dict[str, Any], allow_meta: bool = False) -> None:
        """Raise ``RuntimeError`` for the first of ``params`` the fused kernels cannot step."""
        problem = Adan._fused_problem(params, group, allow_meta)
        if problem:
            raise RuntimeError(f"Adan(fused=True): {_FUSED_REFUSAL} (float32, bfloat16, float16, "
                               f"complex64, dense, on a device with a fused backend): {problem}")

    @staticmethod
    def _fused_problem(params: List[Tensor], group: Dict[str, Any], allow_meta: bool = False) -> str:
        """Why the fused kernels cannot step the first parameter of ``params`` they cannot step
        ('' when they can step all).  ``step()`` asks this for every parameter at every step, so the
        backend, which depends only on the device and the group's options, is asked once per device."""
        eight_bit = group["state_dtype"] == lowmem.EIGHT_BIT
        device_problems: Dict[torch.device, str] = {}
        for p in params:
            if p.dtype not in FUSED_DTYPES:
                return f"a parameter has dtype {p.dtype}"
            if not _is_dense(p):
                return f"a parameter is a non-dense view (strides {p.stride()})"
            if eight_bit and any_sharded([p]):
                return ("state_dtype='8bit' does not support sharded (DTensor) parameters: its blocks would "
                        "straddle shards")
            device = p.device
            problem = device_problems.get(device)
            if problem is None:
                if allow_meta and device.type == "meta":
                    problem = ""
                else:
                    backend, why = _select_backend(device, group, group["fused_backend"])
                    problem = "" if backend is not None else f"no fused backend for parameters on {device}: {why}"
                device_problems[device] = problem
            if problem:
                return problem
        return ""

    def __getstate__(self) -> Dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and groups; losing
        # the group would silently turn a global clip into a local one.
        return {**super().__getstate__(), "clip_process_group": self.clip_process_group}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("clip_process_group", None)
        self.__dict__.setdefault("skipped_steps", None)
        self.defaults.setdefault("kahan_sum", False)  # an optimizer pickled before the option existed
        for group in self.param_groups:
            for key in ("max_grad_norm", "no_prox", "caution", "foreach", "fused", "kahan_sum") + _FUSED_ONLY:
                group.setdefault(key, self.defaults.get(key))
        # mmpretrain's Adan keeps the previous gradient itself ('pre_grad');
        # ours, like the official and timm versions, keeps its negation.
        for st in self.state.values():
            if isinstance(st, dict) and "pre_grad" in st and "neg_pre_grad" not in st:
                st["neg_pre_grad"] = st.pop("pre_grad").neg()

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """torch's state_dict, with 8-bit codes saved as ``<key>_codes`` (:func:`adan_plugin.lowmem.saved_form`:
        another Adan loading the file must not take them for float states)."""
        sd = super().state_dict()
        sd["state"] = {index: lowmem.saved_form(st) for index, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint from this class, the official, timm's or mmpretrain's Adan.

        The checkpoint is checked completely (every group key, every state
        entry: tensor, shape, dtype, no meta tensors, step counts) before
        anything is changed, so a truncated, corrupted or foreign (SGD, AdamW)
        one raises ``ValueError`` naming the problem and leaves the optimizer
        as it was.

        What ``param_groups`` says after loading is what ``step()`` does:

        * hyper-parameters (``lr``, ``betas``, ``eps``, ``weight_decay``,
          ``max_grad_norm``, ``no_prox``, ``caution``, ``skip_nonfinite`` and
          any extra key such as a scheduler's ``initial_lr``) come from the
          checkpoint; one it lacks (other Adans have no ``max_grad_norm``)
          keeps this optimizer's value;
        * execution choices (``fused``, ``foreach``, ``state_dtype``,
          ``capturable``, ``kahan_sum``) stay this optimizer's: a checkpoint of a fused run
          loads where the kernels are absent;
        * an option this optimizer cannot honour (``caution=True`` into a
          fused-only optimizer, ``skip_nonfinite=True`` into ``fused=False``)
          or groups that disagree on an optimizer-wide option
          (``max_grad_norm``, ``skip_nonfinite``) is refused.

        States are stored in this optimizer's state dtype (fp16 states of an
        older checkpoint load as fp32) and in the parameter's memory layout;
        8-bit states are dequantized for a float-state optimizer and float
        states quantized for a ``state_dtype="8bit"`` one (lowmem's state hook
        in :mod:`adan_plugin.validation`); a Kahan buffer is kept only where
        ``kahan_sum`` applies.
        """
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, state = prepare_state_dict(state_dict, self.param_groups, self._check_honourable)
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

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
            sd = default_state_dtype(p, None)
            if len(state) == 0:
                for key in MOMENT_KEYS:
                    state[key] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
            if first_step or "neg_pre_grad" not in state:
                # A parameter's first gradient has no predecessor: seeding
                # -g makes the difference zero, as Algorithm 1 specifies.
                seed = torch.empty_like(p, dtype=sd, memory_format=torch.preserve_format).copy_(g)
                if grad_coef is not None:
                    seed.mul_(grad_coef)
                state["neg_pre_grad"] = seed.neg_()
            m.append(state["exp_avg"])
            n.append(state["exp_avg_sq"])
            d.append(state["exp_avg_diff"])
            neg.append(state["neg_pre_grad"])
            comps.append(lowmem.kahan_buffer(state, p, group["kahan_sum"]))
        return m, n, d, neg, comps

    def _check_step(self, gathered, fused: List[bool]) -> List[Dict[str, float]]:
        """Everything ``step()`` could refuse, checked before its first write; the groups'
        hyper-parameters as host floats."""
        hypers = []
        for group, (params, _), is_fused in zip(self.param_groups, gathered, fused):
            hypers.append(step_hyperparameters(group))
            if not is_fused or not params:
                continue
            if group["caution"]:
                raise ValueError("Adan: the fused kernels do not implement caution=True; use fused=False")
            self._check_fused_params(params, group)
        if not any(params for params, _ in gathered):
            self._warn_if_left_on_meta()
        return hypers

    def _warn_if_left_on_meta(self) -> None:
        """A step without any gradient while parameters are still on the meta device is a no-op, as torch's
        optimizers make it, but most likely a mistake: the model's parameters were replaced after the
        optimizer took them (``module.to_empty()`` makes new ones unless torch's swap-on-conversion is
        set), and every step would silently do nothing.  Said once per place, by Python's default filter."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.is_meta:
                    warnings.warn(
                        f"Adan.step: param_groups[{gi}]['params'][{pi}] is on the meta device and no parameter "
                        "has a gradient, so this step does nothing: the optimizer holds parameters the model no "
                        "longer uses (module.to_empty() or load_state_dict(assign=True) made new ones). Build the "
                        "optimizer after materializing the model, or call torch.__future__."
                        "set_swap_module_params_on_conversion(True) before to_empty()", stacklevel=3)
                    return

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        gathered = [self._gather(group) for group in self.param_groups]
        fused = [self._uses_fused(group) for group in self.param_groups]
        hypers = self._check_step(gathered, fused)
        # Optimizer-wide options: every group holds the same value (checked when set).
        max_grad_norm, skip = hypers[0]["max_grad_norm"], self.param_groups[0]["skip_nonfinite"]
        # Set by torch.amp.GradScaler.step() when _step_supports_amp_scaling:
        # device tensors, never read here.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        grad_coef = None
        clip = max_grad_norm > 0
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
                    grad_coef = clip_coefficient(sq_norm, max_grad_norm, host_float(self.defaults["eps"]))
                if skip:
                    # A NaN or Inf anywhere makes the squared norm non-finite:
                    # skip the step the way GradScaler's found_inf does.
                    nonfinite = (~torch.isfinite(sq_norm)).to(torch.float32)
                    if self.skipped_steps is None:
                        self.skipped_steps = torch.zeros((), dtype=torch.float32, device=sq_norm.device)
                    self.skipped_steps.add_(nonfinite)
                    found_inf = nonfinite if found_inf is None else torch.maximum(
                        found_inf.to(nonfinite.device, torch.float32, non_blocking=True), nonfinite)

        for group, (params, grads), is_fused, hp in zip(self.param_groups, gathered, fused, hypers):
            if is_fused:
                fused_group_step(self, group, params, grads, grad_coef, grad_scale, found_inf, hp)
                continue
            # Like the official, timm and mmpretrain versions, the step count
            # advances for every group, with or without gradients.
            group["step"] = int(group.get("step", 0)) + 1
            if not params:
                continue
            m, n, d, neg, comps = self._init_state(group, params, grads, grad_coef)
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
                step=group["step"], lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], beta3=hp["beta3"],
                eps=hp["eps"], weight_decay=hp["weight_decay"], no_prox=group["no_prox"],
                caution=group["caution"], grad_coef=grad_coef,
                kahan_comps=comps if any(c is not None for c in comps) else None,
            )
        return loss


class FusedAdan(Adan):
    """:class:`Adan` with ``fused=True``: the compiled kernels, or a clear error."""

    def __init__(self, params: Iterable, *args, **kwargs):
        kwargs.setdefault("fused", True)
        super().__init__(params, *args, **kwargs)
