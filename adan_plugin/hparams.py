"""Turn an AdamW recipe into an Adan starting point.

The guidance, as published by the Adan authors
------------------------------------------------
Source: the Adan paper (Xie et al., "Adan: Adaptive Nesterov Momentum
Algorithm for Faster Optimizing Deep Models", arXiv 2208.06677, the
experimental settings of Sec. 5 and the appendix) and the authors' code
release, https://github.com/sail-sg/Adan (README, "Tips for experiments",
and the timm recipes of its model zoo, which ``configs/timm/`` reproduces).

* Peak learning rate: Adan tolerates, and wants, a much larger peak lr than
  AdamW.  In the authors' vision experiments (ViT, ResNet, ConvNeXt trained
  from scratch) it is 5-10x AdamW's at the same batch size; for fine-tuning
  a pre-trained model the gap is smaller, about 2x.
* Weight decay: 0.02 in nearly all of the authors' vision recipes,
  whatever AdamW used (commonly 0.05).
* Betas (code convention, i.e. the paper's ``1 - beta``): (0.98, 0.92, 0.99);
  the authors report Adan to be robust to them (beta2 especially) and
  suggest tuning beta3 first, then beta1, if at all.
* Warmup: the larger peak lr needs a longer warmup; the zoo recipes warm up
  for 40-60 epochs of 100-300 (e.g. 60 of 150 and 60 of 300 for ViT-S).

What :func:`adamw_to_adan` does with that
-----------------------------------------
``lr * lr_scale`` with ``lr_scale`` 5 (the low end of 5-10x) or 2 when
``finetune``; weight decay 0.02; betas (0.98, 0.92, 0.99); warmup, when
``lr_scale > 2``, at least twice AdamW's and, when the run length is known,
at least ``min(60, 0.4 * epochs)`` -- which gives the zoo's 60 for 150 and
300 epochs and 40 for 100.  The result is a starting point to tune, not a
promise; every choice is returned in ``notes``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

ADAN_BETAS = (0.98, 0.92, 0.99)
ADAN_WEIGHT_DECAY = 0.02
SCRATCH_LR_SCALE = 5.0  # published range 5-10x
FINETUNE_LR_SCALE = 2.0
_WARMUP_CAP_EPOCHS = 60.0
_WARMUP_FRACTION = 0.4


@dataclass
class AdanRecipe:
    lr: float
    weight_decay: float
    betas: Tuple[float, float, float]
    eps: float
    warmup_epochs: Optional[float]
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def timm_args(self) -> List[str]:
        """The recipe as timm ``train.py`` / ``tools/train_timm.py`` flags."""
        args = ["--opt", "adan", "--lr", f"{self.lr:g}", "--weight-decay", f"{self.weight_decay:g}",
                "--opt-betas", *[f"{b:g}" for b in self.betas], "--opt-eps", f"{self.eps:g}"]
        if self.warmup_epochs is not None:
            args += ["--warmup-epochs", f"{self.warmup_epochs:g}"]
        return args


def _positive(name: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"adamw_to_adan: {name} must be a finite number "
                         f"{'>= 0' if allow_zero else '> 0'}, got {value!r}")


def adamw_to_adan(lr: float, weight_decay: Optional[float] = None, warmup_epochs: Optional[float] = None,
                  betas: Optional[Sequence[float]] = None, epochs: Optional[float] = None,
                  finetune: bool = False, lr_scale: Optional[float] = None, eps: float = 1e-8) -> AdanRecipe:
    """An Adan starting point for an AdamW recipe (see the module docstring for the guidance).

    Args:
        lr: AdamW's peak learning rate (at the batch size you will use).
        weight_decay: AdamW's weight decay; only reported, Adan uses 0.02.
        warmup_epochs: AdamW's warmup length (any unit, as long as ``epochs``
            uses the same one).
        betas: AdamW's (beta1, beta2); only reported, Adan uses its own three.
        epochs: total training length, used to size the warmup.
        finetune: fine-tuning a pre-trained model (lr x2 instead of x5).
        lr_scale: override the lr multiplier (the guidance is 5-10 from scratch, ~2 fine-tuning).
    """
    _positive("lr", lr)
    _positive("weight_decay", weight_decay, allow_zero=True)
    _positive("warmup_epochs", warmup_epochs, allow_zero=True)
    _positive("epochs", epochs)
    _positive("lr_scale", lr_scale)
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        raise ValueError(f"adamw_to_adan: AdamW betas must be two numbers in [0, 1), got {tuple(betas)!r}")

    notes = []
    scale = lr_scale if lr_scale is not None else (FINETUNE_LR_SCALE if finetune else SCRATCH_LR_SCALE)
    notes.append(f"lr: {lr:g} x {scale:g} = {lr * scale:g} (published: 5-10x AdamW from scratch, ~2x fine-tuning)")
    if weight_decay is not None and weight_decay != ADAN_WEIGHT_DECAY:
        notes.append(f"weight_decay: AdamW's {weight_decay:g} replaced by Adan's usual {ADAN_WEIGHT_DECAY:g}")
    if betas is not None:
        notes.append(f"betas: AdamW's {tuple(betas)} do not carry over; Adan's defaults {ADAN_BETAS} are used")

    warmup = warmup_epochs
    if warmup_epochs is not None and scale > FINETUNE_LR_SCALE:
        warmup = 2.0 * warmup_epochs
        if epochs is not None:
            warmup = max(warmup, min(_WARMUP_CAP_EPOCHS, _WARMUP_FRACTION * epochs))
        if epochs is not None:
            warmup = min(warmup, epochs)
        notes.append(f"warmup: {warmup_epochs:g} -> {warmup:g} (a larger peak lr needs a longer warmup)")
    elif warmup_epochs is None and epochs is not None and scale > FINETUNE_LR_SCALE:
        warmup = min(_WARMUP_CAP_EPOCHS, _WARMUP_FRACTION * epochs)
        notes.append(f"warmup: none given, {warmup:g} suggested for {epochs:g} epochs")
    return AdanRecipe(lr=lr * scale, weight_decay=ADAN_WEIGHT_DECAY, betas=ADAN_BETAS, eps=eps,
                      warmup_epochs=warmup, notes=notes)
