"""Registration of Adan into the trainers' registries (timm, mmengine).

Each integration registers only when its package is installed; a missing
package is not an error, a broken one is reported once as a warning.
"""
from __future__ import annotations

import importlib.util
import warnings


def register_all() -> None:
    for package, module in (("timm", "timm"), ("mmengine", "mmengine")):
        if importlib.util.find_spec(package) is None:
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
            mod.register()
        except ImportError as err:  # an installed but unusable package
            warnings.warn(f"adan_plugin: not registered with {package}: {err}", RuntimeWarning, stacklevel=2)
