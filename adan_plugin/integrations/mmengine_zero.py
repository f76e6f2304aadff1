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

import difflib
import inspect
from typing import Any, Optional, Type, Union

import torch
from mmengine.optim.optimizer.zero_optimizer import ZeroRedundancyOptimizer as _MMEngineZero
from mmengine.registry import OPTIMIZERS
from torch.distributed.optim import ZeroRedundancyOptimizer as _TorchZero

from ..adan import Adan

# Keywords of torch's ZeroRedundancyOptimizer itself; all others go to the local optimizer.
_ZERO_KEYS = ("process_group", "parameters_as_bucket_view", "overlap_with_ddp")


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


def check_optimizer_kwargs(optimizer_class: type, kwargs: dict) -> None:
    """Raise ``TypeError`` naming an option ``optimizer_class`` does not take, with the closest match."""
    params = inspect.signature(optimizer_class.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [name for name in params if name not in ("self", "params")]
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{optimizer_class.__name__}: unknown option {key!r}{hint}; "
                            f"its options are {', '.join(known)}")


def _takes(optimizer_class: type, name: str) -> bool:
    return name in inspect.signature(optimizer_class.__init__).parameters


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
        optimizer_kwargs = {k: v for k, v in kwargs.items() if k not in _ZERO_KEYS}
        check_optimizer_kwargs(optimizer_class, optimizer_kwargs)
        if issubclass(optimizer_class, Adan) and kwargs.get("max_grad_norm", 0) > 0:
            if not _takes(optimizer_class, "clip_process_group"):
                raise RuntimeError(
                    "ZeroRedundancyOptimizer with Adan(max_grad_norm > 0): this Adan cannot all-reduce "
                    "the gradient norm across ranks (no clip_process_group option), so each rank would clip "
                    "its shard by the shard's norm. Set max_grad_norm=0 or update adan_plugin.")
            kwargs.setdefault("clip_process_group", process_group if process_group is not None else "world")
        params = list(params)
        # mmengine's __init__ would resolve optimizer_type in torch.optim only; its
        # checks (torch >= 1.12, rpc) hold for every torch this package supports.
        _TorchZero.__init__(self, params, optimizer_class, process_group=process_group, **kwargs)

