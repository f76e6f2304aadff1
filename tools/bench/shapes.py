"""Parameter shapes of the benchmarked models: timm models built on the meta device, GPT-2 layouts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


# ------------------------------------------------------------------------------------------- shapes
def timm_shapes(name: str) -> List[Shape]:
    """Parameter shapes of a timm model, built on the meta device (no weights, no download)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return [tuple(p.shape) for p in model.parameters()]


def gpt2_shapes(layers: int, width: int, vocab: int, context: int) -> List[Shape]:
    """GPT-2 parameter shapes: token and position embeddings (the output head is tied to the token
    embedding), per layer LayerNorm, fused qkv, attention projection, LayerNorm, fc (4x width), fc2,
    each Linear with a bias, and the final LayerNorm."""
    shapes: List[Shape] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,),                        # ln_1
                   (3 * width, width), (3 * width,),          # qkv
                   (width, width), (width,),                  # attention output projection
                   (width,), (width,),                        # ln_2
                   (4 * width, width), (4 * width,),          # fc
                   (width, 4 * width), (width,)]              # fc2
    shapes += [(width,), (width,)]                            # final LayerNorm
    return shapes


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    shapes: Callable[[], List[Shape]]
    cpu_default: bool = True


# The GPT-2 rows follow the table of the official Adan repository's fused kernel README: 24 layers,
# embedding width 1536 / 2048, vocabulary 49280, sequence length 2048 (used here as the position table).
MODELS: Dict[str, ModelSpec] = {
    "resnet50": ModelSpec("resnet50", "timm resnet50", lambda: timm_shapes("resnet50")),
    "resnet101": ModelSpec("resnet101", "timm resnet101", lambda: timm_shapes("resnet101"), cpu_default=False),
    "vit_small_patch16_224": ModelSpec("vit_small_patch16_224", "timm vit_small_patch16_224",
                                       lambda: timm_shapes("vit_small_patch16_224"), cpu_default=False),
    "vit_base_patch16_224": ModelSpec("vit_base_patch16_224", "timm vit_base_patch16_224",
                                      lambda: timm_shapes("vit_base_patch16_224")),
    "convnext_tiny": ModelSpec("convnext_tiny", "timm convnext_tiny", lambda: timm_shapes("convnext_tiny")),
    "gpt2-1536": ModelSpec("gpt2-1536", "GPT-2, 24 layers, width 1536, vocab 49280",
                           lambda: gpt2_shapes(24, 1536, 49280, 2048), cpu_default=False),
    "gpt2-2048": ModelSpec("gpt2-2048", "GPT-2, 24 layers, width 2048, vocab 49280",
                           lambda: gpt2_shapes(24, 2048, 49280, 2048), cpu_default=False),
    # For smoke tests of this tool only.
    "tiny": ModelSpec("tiny", "GPT-2 layout, 2 layers, width 32, vocab 128 (smoke test)",
                      lambda: gpt2_shapes(2, 32, 128, 16), cpu_default=False),
}


def numel(shapes: Sequence[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)
