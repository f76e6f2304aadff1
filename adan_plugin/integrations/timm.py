"""Registers adan_plugin's optimizers in timm's optimizer registry."""
from __future__ import annotations

from timm.optim import _optim_factory as factory

from ..adan import Adan, FusedAdan


def _infos():
    common = dict(has_betas=True, num_betas=3)
    return [
        factory.OptimInfo("adan", Adan, "Adan (adan_plugin), proximal weight decay",
                          defaults={"no_prox": False}, **common),
        factory.OptimInfo("adanw", Adan, "Adan (adan_plugin), decoupled weight decay",
                          defaults={"no_prox": True}, **common),
        factory.OptimInfo("cadan", Adan, "Cautious Adan (adan_plugin), proximal weight decay",
                          defaults={"no_prox": False, "caution": True}, **common),
        factory.OptimInfo("cadanw", Adan, "Cautious Adan (adan_plugin), decoupled weight decay",
                          defaults={"no_prox": True, "caution": True}, **common),
        factory.OptimInfo("fusedadan", FusedAdan, "Adan (adan_plugin) fused kernels, proximal weight decay",
                          defaults={"no_prox": False}, **common),
        factory.OptimInfo("fusedadanw", FusedAdan, "Adan (adan_plugin) fused kernels, decoupled weight decay",
                          defaults={"no_prox": True}, **common),
    ]


def register(registry=None) -> None:
    registry = registry or factory.default_registry
    for info in _infos():
        # Replacing timm's own Adan is the point; drop it first so timm does
        # not log an "overwriting" warning on every import.
        registry._optimizers.pop(info.name, None)
        registry.register(info)
