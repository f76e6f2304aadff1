"""Installs adan_plugin.  The fused-kernel extension (adan_plugin._C) is added
by the csrc build; without it everything but ``fused=True`` works."""
from setuptools import find_packages, setup

setup(
    name="adan_plugin",
    version="0.1.0",
    description="Adan optimizer for PyTorch vision training, with fused kernels and timm/OpenMMLab integration",
    packages=find_packages(include=["adan_plugin", "adan_plugin.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "timm": ["timm>=1.0"],
        "mm": ["mmengine>=0.10", "mmpretrain>=1.2", "mmcv-lite>=2.0"],
    },
)
