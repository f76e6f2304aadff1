"""Registers adan_plugin's optimizers in mmengine's root ``OPTIMIZERS``."""
from __future__ import annotations

from mmengine.registry import OPTIMIZERS

from ..adan import Adan, FusedAdan


def register() -> None:
    OPTIMIZERS.register_module(name="Adan", module=Adan, force=True)
    OPTIMIZERS.register_module(name="FusedAdan", module=FusedAdan, force=True)
