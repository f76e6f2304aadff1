"""scikit-learn's digits (1797 8x8 images, 10 classes) as the embedded dataset.

Nothing is downloaded: the images ship inside scikit-learn.  For image
pipelines (timm, mmpretrain) they are written once to an ImageFolder tree
``<root>/{train,val}/<class>/<index>.png`` as upscaled RGB images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

SPLIT_SEED = 0
VAL_FRACTION = 0.2
_DONE_MARKER = ".complete"


def _split(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def digits_tensors(val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED):
    """``(x_train, y_train, x_val, y_val)``: images as float32 in [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, val_idx = _split(len(y), val_fraction, seed)
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def default_cache_dir() -> Path:
    base = os.environ.get("ADAN_PLUGIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "adan_plugin")
    return Path(base)


def write_digits_imagefolder(root: Optional[os.PathLike] = None, size: int = 32,
                             val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> Path:
    """Write the digits to an ImageFolder tree once; return its root.

    The tree is complete when ``root/.complete`` exists; an interrupted
    write is redone from scratch rather than trusted.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root) if root is not None else default_cache_dir() / f"digits_{size}px"
    if (root / _DONE_MARKER).exists():
        return root
    data = load_digits()
    images = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
    train_idx, val_idx = _split(len(images), val_fraction, seed)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for cls in range(10):
            (root / split / str(cls)).mkdir(parents=True, exist_ok=True)
        for i in indices:
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            img.save(root / split / str(int(data.target[i])) / f"{int(i):04d}.png")
    (root / _DONE_MARKER).write_text(f"{len(train_idx)} train, {len(val_idx)} val, {size}px\n")
    return root
