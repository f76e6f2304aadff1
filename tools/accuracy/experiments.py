"""The accuracy experiments of issue 11: the tasks, the optimizer configurations, which run where, and
the criteria (tools/lowmem_accuracy.py runs them)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRITERION_POINTS = 0.5
BASELINE = "fp32"
MEAN = STD = (0.5, 0.5, 0.5)  # test_resnet's and vit's pretrained_cfg


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    model: str
    model_kwargs: Dict[str, Any]
    epochs: int
    train_fraction: float = 1.0  # of the 1437 training images, a fixed class-stratified subset
    lr: float = 1e-2
    weight_decay: float = 0.02
    batch_size: int = 64
    warmup_epochs: int = 1
    warmup_lr: float = 1e-4
    min_lr: float = 1e-5
    smoothing: float = 0.1
    scale: Tuple[float, float] = (0.7, 1.0)
    ratio: Tuple[float, float] = (0.85, 1.18)


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)
    param_dtype: torch.dtype = torch.float32


TASKS: Dict[str, Task] = {
    "digits": Task("digits", "digits demo: timm test_resnet, 8 epochs, all 1437 training images",
                   "test_resnet", {}, epochs=8),
    # Chosen by a quick measurement (docs/lowmem_accuracy.md, "The harder task"): a 4-block ViT of width
    # 64 on 8x8 patches of the 32 px digits, mean-pooled, batch 32, 10 epochs, ends near 92% with fp32
    # Adan: off the ceiling, so an optimizer that loses accuracy shows; about a minute per run.
    "vit": Task("vit", "small ViT (dim 64, depth 4, 4 heads, patch 8, mean-pooled), batch 32, 10 epochs",
                "vit_tiny_patch16_224",
                dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, global_pool="avg",
                     class_token=False),
                epochs=10, batch_size=32, lr=5e-3, weight_decay=0.02),
}

CONFIGS: Dict[str, Config] = {
    "fp32": Config("fp32", "fp32 parameters, fp32 states (fused)", dict(fused=True)),
    "8bit": Config("8bit", "fp32 parameters, 8-bit block-wise states (fused)", dict(fused=True, state_dtype="8bit")),
    "bf16state": Config("bf16state", "fp32 parameters, bf16 states (fused)",
                        dict(fused=True, state_dtype=torch.bfloat16)),
    "bf16": Config("bf16", "bf16 parameters and states, no compensation (fused)", dict(fused=True),
                   param_dtype=torch.bfloat16),
    "bf16kahan": Config("bf16kahan", "bf16 parameters and states, kahan_sum=True (fused)",
                        dict(fused=True, kahan_sum=True), param_dtype=torch.bfloat16),
}

# The experiments of issue 11: which configurations run on which task.
PLAN: Dict[str, Tuple[str, ...]] = {
    "digits": ("fp32", "8bit", "bf16state", "bf16", "bf16kahan"),
    "vit": ("fp32", "8bit", "bf16state"),
}
# The comparisons the issue asks for: (task, configuration) against (task, BASELINE).
CRITERIA: Tuple[Tuple[str, str], ...] = (("digits", "8bit"), ("vit", "8bit"), ("digits", "bf16kahan"))
SEEDS = (0, 1, 2)
