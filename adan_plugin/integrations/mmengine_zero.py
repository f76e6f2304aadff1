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
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Type, Union

import torch
from mmengine.optim.optimizer.zero_optimizer import ZeroRedundancyOptimizer as _MMEngineZero
from mmengine.registry import OPTIMIZERS
from torch.distributed.optim import ZeroRedundancyOptimizer as _TorchZero

from ..adan import Adan
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

    ``state_dict()`` is mmengine's: a collective that gathers every rank's
    shard on rank 0 (other ranks return ``{}``).
    """

    def __init__(self, params, optimizer_type: Union[str, type], process_group: Optional[Any] = None,
                 **kwargs):
        optimizer_class = resolve_optimizer_class(optimizer_type)
        zero_kwargs = {k: kwargs.pop(k) for k in _ZERO_KEYS if k in kwargs}
        kwargs = optimizer_options_from_config(optimizer_class, kwargs)
        if issubclass(optimizer_class, Adan) and kwargs.get("max_grad_norm", 0) > 0:
            kwargs.setdefault("clip_process_group", process_group if process_group is not None else "world")
        params = list(params)
        # mmengine's __init__ would resolve optimizer_type in torch.optim only; its
        # checks (torch >= 1.12, rpc) hold for every torch this package supports.
        _TorchZero.__init__(self, params, optimizer_class, process_group=process_group, **zero_kwargs,
                            **kwargs)

