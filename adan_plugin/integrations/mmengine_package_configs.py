"""``_base_ = ['mmpretrain::_base_/...']`` without ``pkg_resources``.

mmengine 0.10 finds a package's bundled configs (``<package>::<path>``) through
``pkg_resources``, which setuptools removed in version 81, so on a current
environment every config that inherits from a package's ``.mim/configs`` fails
with ``No module named 'pkg_resources'``.  When ``pkg_resources`` is missing,
the two lookups mmengine's config loader needs are answered from
``importlib`` instead; with ``pkg_resources`` present nothing is changed.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os.path as osp


def _is_installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package)
        return spec is not None and spec.origin is not None


def _get_installed_path(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{package} is not installed (or is a namespace package), so its bundled "
                                  "configs cannot be found")
    return osp.dirname(spec.origin)


def enable_package_base_configs() -> bool:
    """Install the importlib lookups into mmengine's config loader if it needs them.

    Returns whether it did.
    """
    if importlib.util.find_spec("pkg_resources") is not None:
        return False
    import mmengine.config.config as config_module

    config_module.is_installed = _is_installed
    config_module.get_installed_path = _get_installed_path
    return True
