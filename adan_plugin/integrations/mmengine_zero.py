"""mmengine's ``ZeroRedundancyOptimizer``, with ``optimizer_type`` looked up in the registry.

mmengine's own wrapper resolves ``optimizer_type`` with ``getattr(torch.optim,
...)``, so ``dict(type='ZeroRedundancyOptimizer', optimizer_type='Adan')``
fails, although Adan's authors recommend ZeRO to shard Adan's four state
tensors.  This one resolves the name through ``OPTIMIZERS`` in the current
scope (torch's optimizers are registered there too, so every config that
worked still works) and accepts a class as well.

Under ZeRO each rank's optimizer holds only its shard of the parameters, so a
norm computed by the local optimizer is the norm of that shard.  When Adan
clips (``max_grad_norm > 0``) it is therefore told to all-reduce the squared
norm over ZeRO's process group (``clip_process_group``), which makes the clip
the one single-process training would apply.

Saving: mmengine's ``Runner.save_checkpoint`` runs on rank 0 only, but gathering
the shards into one state dict is a collective, so with mmengine's wrapper the
first checkpoint deadlocks.  :class:`ZeroCheckpointHook` gathers them on every
rank just before ``CheckpointHook`` saves; ``state_dict()`` then reuses that
gather.  ``tools/train_mm.py`` adds the hook by itself; other launchers need
``custom_hooks=[dict(type='ZeroCheckpointHook')]`` in the config.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Type, Union

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.optim.optimizer.zero_optimizer import ZeroRedundancyOptimizer as _MMEngineZero
from mmengine.registry import OPTIMIZERS
from torch.distributed.optim import ZeroRedundancyOptimizer as _TorchZero

from ..adan import Adan
from ..validation import prepare_param_state
from .mmengine_options import optimizer_options_from_config

# Keywords of torch's ZeroRedundancyOptimizer itself (besides process_group); all
# others are the local optimizer's.
_ZERO_KEYS = ("parameters_as_bucket_view", "overlap_with_ddp")


def resolve_optimizer_class(optimizer_type: Union[str, Type[torch.optim.Optimizer]]) -> Type[torch.optim.Optimizer]:
    """The optimizer class named by ``optimizer_type`` in the current scope."""
    if isinstance(optimizer_type, str):
        with OPTIMIZERS.switch_scope_and_registry(None) as registry:
            try:
                cls = registry.get(optimizer_type)
            except RuntimeError:  # mmengine raises this for a name it cannot find anywhere
                cls = None
        if cls is None:
            raise KeyError(f"ZeroRedundancyOptimizer: optimizer_type={optimizer_type!r} is not a registered "
                           f"optimizer (registered: {sorted(OPTIMIZERS.module_dict)})")
        optimizer_type = cls
    if not (inspect.isclass(optimizer_type) and issubclass(optimizer_type, torch.optim.Optimizer)):
        raise TypeError(f"ZeroRedundancyOptimizer: optimizer_type must name a torch.optim.Optimizer "
                        f"subclass, got {optimizer_type!r}")
    return optimizer_type


class ZeroRedundancyOptimizer(_MMEngineZero):
    """ZeRO-1 (optimizer state sharding) for any registered optimizer, Adan included.

    Args:
        params: parameters or parameter groups (``paramwise_cfg`` works).
        optimizer_type: a name registered in ``OPTIMIZERS`` (``'Adan'``,
            ``'AdamW'``, ...) or an optimizer class.
        process_group: the group to shard over (default: the world).
        **kwargs: the local optimizer's options, and torch's
            ``parameters_as_bucket_view`` / ``overlap_with_ddp``.

    ``state_dict()`` returns the whole state on rank 0 and ``{}`` elsewhere; it
    gathers the shards (a collective: every rank must call it) unless
    :meth:`consolidate_state_dict` already did since the last step.
    """

    def __init__(self, params, optimizer_type: Union[str, type], process_group: Optional[Any] = None,
                 **kwargs):
        optimizer_class = resolve_optimizer_class(optimizer_type)
        zero_kwargs = {k: kwargs.pop(k) for k in _ZERO_KEYS if k in kwargs}
        kwargs = optimizer_options_from_config(optimizer_class, kwargs)
        if issubclass(optimizer_class, Adan) and kwargs.get("max_grad_norm", 0) > 0:
            # By name: ZeRO keeps this keyword in its state_dict, where a ProcessGroup would not pickle.
            kwargs.setdefault("clip_process_group",
                              process_group.group_name if process_group is not None else "world")
        params = list(params)
        # mmengine's __init__ would resolve optimizer_type in torch.optim only; its
        # checks (torch >= 1.12, rpc) hold for every torch this package supports.
        _TorchZero.__init__(self, params, optimizer_class, process_group=process_group, **zero_kwargs,
                            **kwargs)


    def step(self, closure=None, **kwargs):
        self._gathered = False
        return _TorchZero.step(self, closure, **kwargs)

    def load_state_dict(self, state_dict) -> None:
        if isinstance(self.optim, Adan):
            state_dict = self._adan_states_checked(state_dict)
        self._gathered = False
        _TorchZero.load_state_dict(self, state_dict)

    def _adan_states_checked(self, state_dict):
        """A copy of ``state_dict`` whose states for this rank's parameters are checked and converted as
        ``Adan.load_state_dict`` does (a damaged one raises before anything changes; 8-bit codes saved as
        ``<key>_codes`` back under the states' keys; float <-> 8-bit states for the local optimizer's
        ``state_dtype``): torch's ZeRO writes each state into the local optimizer as it finds it."""
        where = "ZeroRedundancyOptimizer.load_state_dict"
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
                or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError(f"{where}: expected an optimizer state_dict (a dict with 'state' and 'param_groups')")
        index_to_param = self._index_to_param
        group_of = {p: g for g in self.optim.param_groups for p in g["params"]}
        states = {}
        for index, st in state_dict["state"].items():
            if not (isinstance(index, int) and 0 <= index < len(index_to_param)):
                raise ValueError(f"{where}: state for parameter id {index!r}, which no parameter group lists")
            param = index_to_param[index]
            if self._param_to_rank[param] == self.rank:
                st = prepare_param_state(st, param, group_of[param], f"{where}: the state of parameter {index!r}")
            states[index] = st
        return {**state_dict, "state": states}

    def consolidate_state_dict(self, to: int = 0) -> None:
        _TorchZero.consolidate_state_dict(self, to)
        self._gathered = True

    def state_dict(self):
        if not getattr(self, "_gathered", False):
            self.consolidate_state_dict()
        return _TorchZero.state_dict(self) if is_main_process() else dict()


class ZeroCheckpointHook(Hook):
    """Gathers ZeroRedundancyOptimizer shards on every rank before ``CheckpointHook`` saves."""

    priority = "LOW"  # runs before CheckpointHook ('VERY_LOW') at the same point

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        hook = _checkpoint_hook(runner)
        if hook is not None and not hook.by_epoch and (
                hook.every_n_train_iters(runner, hook.interval, hook.save_begin)
                or (hook.save_last and hook.is_last_train_iter(runner))):
            _gather(runner)

    def after_train_epoch(self, runner) -> None:
        hook = _checkpoint_hook(runner)
        if hook is not None and hook.by_epoch and (
                hook.every_n_epochs(runner, hook.interval, hook.save_begin)
                or (hook.save_last and hook.is_last_train_epoch(runner))):
            _gather(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        hook = _checkpoint_hook(runner)
        if hook is not None and hook.save_best and metrics:  # may save a best checkpoint
            _gather(runner)


def _checkpoint_hook(runner):
    return next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)


def _gather(runner) -> None:
    wrappers = getattr(runner.optim_wrapper, "values", lambda: [runner.optim_wrapper])()
    for wrapper in wrappers:
        optimizer = getattr(wrapper, "optimizer", None)
        if isinstance(optimizer, _TorchZero):
            optimizer.consolidate_state_dict()
