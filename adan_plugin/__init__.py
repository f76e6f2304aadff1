"""adan_plugin: the Adan optimizer (arXiv 2208.06677) for PyTorch vision training.

``import adan_plugin`` also registers ``Adan`` into timm's optimizer factory
(``--opt adan``) and mmengine's ``OPTIMIZERS`` when those packages are installed.
"""
from .adan import Adan, FusedAdan
from ._ext import extension_loaded as fused_extension_available
from .integrations import register_all as _register_all

__all__ = ["Adan", "FusedAdan", "fused_extension_available"]
__version__ = "0.1.0"

_register_all()
