"""``TimmCosineLR``: the learning-rate schedule of the Adan zoo runs, as an mmengine scheduler.

The zoo (``configs/mmpretrain/*_in1k.py``) was trained with timm's
``CosineLRScheduler`` stepped once per epoch, and its cosine is not shifted by
the warmup: at epoch ``t``

    t < warmup_t:          warmup_lr_init + t * (lr - warmup_lr_init) / warmup_t
    warmup_t <= t < t_initial:  lr_min + (lr - lr_min) * (1 + cos(pi * t / t_initial)) / 2
    t >= t_initial:        lr_min            (timm's cooldown epochs)

so when warmup ends the lr drops from about ``lr`` to the cosine's value at
``warmup_t / t_initial``.  mmengine's ``LinearLR`` + ``CosineAnnealingLR``
would restart the cosine at its peak after warmup: a different run.  ``lr``
is each parameter group's initial lr, so ``paramwise_cfg`` multipliers apply.
"""
from __future__ import annotations

import math

from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler


class TimmCosineParamScheduler(_ParamScheduler):
    """timm's ``CosineLRScheduler`` (one cycle, no noise, ``warmup_prefix=False``) for any parameter."""

    def __init__(self, optimizer, param_name: str, t_initial: int, lr_min: float = 0.0, warmup_t: int = 0,
                 warmup_lr_init: float = 0.0, begin: int = 0, end: int = INF, last_step: int = -1,
                 by_epoch: bool = True, verbose: bool = False):
        if t_initial <= 0 or warmup_t < 0:
            raise ValueError(f"TimmCosineLR: t_initial must be > 0 and warmup_t >= 0, got t_initial={t_initial}, "
                             f"warmup_t={warmup_t}")
        self.t_initial = t_initial
        self.lr_min = lr_min
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        super().__init__(optimizer, param_name, begin=begin, end=end, last_step=last_step, by_epoch=by_epoch,
                         verbose=verbose)

    @classmethod
    def build_iter_from_epoch(cls, *args, t_initial, warmup_t=0, begin=0, end=INF, by_epoch=True,
                              epoch_length=None, **kwargs):
        """``convert_to_iter_based=True``: the same curve, updated every iteration (timm's ``sched_on_updates``)."""
        if not by_epoch or not epoch_length or epoch_length <= 0:
            raise ValueError(f"TimmCosineLR: convert_to_iter_based needs by_epoch=True and a positive epoch "
                             f"length, got by_epoch={by_epoch}, epoch_length={epoch_length}")
        return cls(*args, t_initial=t_initial * epoch_length, warmup_t=warmup_t * epoch_length,
                   begin=int(begin * epoch_length), end=end if end == INF else int(end * epoch_length),
                   by_epoch=False, **kwargs)

    def value_at(self, t: int, base: float) -> float:
        if t < self.warmup_t:
            return self.warmup_lr_init + t * (base - self.warmup_lr_init) / self.warmup_t
        if t >= self.t_initial:
            return self.lr_min
        return self.lr_min + 0.5 * (base - self.lr_min) * (1.0 + math.cos(math.pi * t / self.t_initial))

    def _get_value(self) -> list:
        return [self.value_at(self.last_step, base) for base in self.base_values]


class TimmCosineLR(LRSchedulerMixin, TimmCosineParamScheduler):
    """:class:`TimmCosineParamScheduler` for the learning rate.

    Args:
        t_initial: epochs of the cosine (timm's ``epochs``, cooldown excluded).
        lr_min: timm's ``min_lr``; also the lr of the cooldown epochs.
        warmup_t: timm's ``warmup_epochs``.
        warmup_lr_init: timm's ``warmup_lr``.
    """
