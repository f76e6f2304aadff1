"""The data of the accuracy runs: the embedded digits as PIL images, fixed training subsets, timm's
transforms, and each epoch's batches as a function of (seed, epoch) only."""
from __future__ import annotations

import functools
import random
from typing import List, Sequence

import numpy as np
import torch

from .experiments import MEAN, STD, Task

@functools.lru_cache(maxsize=2)
def digits_images(size: int = 32):
    """The 32 px RGB digits exactly as adan_plugin.data.write_digits_imagefolder writes them (PIL images)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from adan_plugin.data.digits import SPLIT_SEED, VAL_FRACTION, _split

    data = load_digits()
    images = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
    train_idx, val_idx = _split(len(images), VAL_FRACTION, SPLIT_SEED)

    def pil(i):
        return Image.fromarray(images[i], mode="L").resize((size, size), Image.BILINEAR).convert("RGB")

    train = [(pil(i), int(data.target[i])) for i in train_idx]
    val = [(pil(i), int(data.target[i])) for i in val_idx]
    return train, val


def stratified_subset(labels: Sequence[int], fraction: float, seed: int = 0) -> List[int]:
    """Indices of a fixed ``fraction`` of each class (the same subset for every run and seed)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    keep: List[int] = []
    labels = np.asarray(labels)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        keep.extend(rng.permutation(idx)[:max(1, int(round(len(idx) * fraction)))].tolist())
    return sorted(keep)


def train_transform(task: Task):
    from timm.data import create_transform
    return create_transform(32, is_training=True, scale=task.scale, ratio=task.ratio, hflip=0.0, vflip=0.0,
                            color_jitter=0.0, interpolation="bilinear", mean=MEAN, std=STD)


def eval_transform():
    from timm.data import create_transform
    return create_transform(32, is_training=False, crop_pct=1.0, interpolation="bilinear", mean=MEAN, std=STD)


def epoch_batches(images, labels, transform, batch_size: int, seed: int, epoch: int):
    """The epoch's augmented, shuffled batches; a function of (seed, epoch) only, not of the optimizer."""
    s = seed * 1000003 + 10007 * (epoch + 1)
    random.seed(s)
    torch.manual_seed(s)
    x = torch.stack([transform(img) for img in images])
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(s))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(y), batch_size)]
