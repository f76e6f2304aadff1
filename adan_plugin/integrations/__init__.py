"""Registration of Adan into the trainers' registries (timm, mmengine).

Importing timm and mmengine costs seconds, so ``import adan_plugin`` does not
import them.  A trainer's registry is filled when the trainer's own module
is imported: at once when it already is, otherwise right after its first
import, through an import hook.  Either way, by the time code can look
``'adan'`` up in timm's optimizer factory or ``'Adan'`` in mmengine's
``OPTIMIZERS``, ours is there.  A broken install is reported as a warning,
never as a failed ``import adan_plugin``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from typing import Dict, Optional

# Top-level package whose import triggers registration -> our integration
# module.  The whole package, not its registry submodule: mmengine's
# ``__init__`` imports its registry halfway through, when the rest of the
# package is not usable yet.
_TRIGGERS: Dict[str, str] = {"timm": "timm", "mmengine": "mmengine"}
_pending: Dict[str, str] = {}
_lock = threading.RLock()


def _register(trigger: str) -> None:
    with _lock:
        integration = _pending.pop(trigger, None)
    if integration is None:
        return
    try:
        importlib.import_module(f"{__name__}.{integration}").register()
    except ImportError as err:  # an installed but unusable package
        warnings.warn(f"adan_plugin: not registered with {integration}: {err}", RuntimeWarning, stacklevel=2)


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs the real loader, then registers into the freshly loaded module."""

    def __init__(self, loader: importlib.abc.Loader, trigger: str):
        self._loader = loader
        self._trigger = trigger

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register(self._trigger)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self._loader, name)


class _TriggerFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterLoad(spec.loader, fullname)
        return spec


_finder: Optional[_TriggerFinder] = None


def __getattr__(name: str):
    """``adan_plugin.integrations.timm`` / ``from adan_plugin.integrations import timm`` before
    timm is imported: import the trainer first (which registers and imports our module)."""
    trigger = next((t for t, integration in _TRIGGERS.items() if integration == name), None)
    if trigger is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(trigger)
    _register(trigger)  # registered already, unless register_all() has not run
    module = sys.modules.get(f"{__name__}.{name}")
    if module is None:  # e.g. the trainer is installed but unusable (a warning said so)
        module = importlib.import_module(f"{__name__}.{name}")
    return module


def register_all() -> None:
    """Register now where the trainer is imported, and on its import otherwise."""
    global _finder
    with _lock:
        for trigger, integration in _TRIGGERS.items():
            _pending.setdefault(trigger, integration)
        if _finder is None:
            _finder = _TriggerFinder()
            sys.meta_path.insert(0, _finder)
    for trigger in list(_TRIGGERS):
        if trigger in sys.modules:
            _register(trigger)
