"""Registers adan_plugin's optimizers with mmengine and mmpretrain.

``import adan_plugin`` (or ``custom_imports=dict(imports=['adan_plugin'])`` in
a config) calls :func:`register`, which

* puts ``Adan`` and ``FusedAdan`` into mmengine's root ``OPTIMIZERS``, so
  ``optim_wrapper=dict(optimizer=dict(type='Adan', ...))`` builds ours in any
  scope that does not define its own ``Adan``;
* replaces mmengine's ``ZeroRedundancyOptimizer`` with one that looks
  ``optimizer_type`` up in the registry and can be checkpointed by the Runner
  (with ``ZeroCheckpointHook``, see :mod:`.mmengine_zero`);
* makes ``type='Adan'`` build ours under ``default_scope='mmpretrain'`` too.
  mmpretrain registers its own ``Adan`` in its child registry, which a lookup
  in that scope would find before the root.  Ours replaces it there, with one
  log line saying so; mmpretrain's stays reachable as ``'MMPretrainAdan'``;
* registers ``TimmCosineLR``, the zoo's lr schedule (see :mod:`.mmengine_schedule`);
* lets configs inherit ``mmpretrain::_base_/...`` where ``pkg_resources`` is
  gone (see :mod:`.mmengine_package_configs`);
* loads local checkpoints with ``weights_only=True`` and the objects mmengine's
  own checkpoints hold allow-listed (so stock tools resume on torch >= 2.6), and
  saves them atomically; registers ``ResumeOptimizerStateHook`` (see
  :mod:`.mmengine_checkpoint`).
"""
from __future__ import annotations

import importlib.util
import logging
import warnings

from mmengine.logging import print_log
from mmengine.registry import HOOKS, OPTIMIZERS, PARAM_SCHEDULERS, Registry, build_from_cfg

from ..adan import Adan, FusedAdan
from .mmengine_checkpoint import ResumeOptimizerStateHook, register_checkpoint_io
from .mmengine_options import optimizer_options_from_config
from .mmengine_package_configs import enable_package_base_configs
from .mmengine_schedule import TimmCosineLR, TimmCosineParamScheduler
from .mmengine_zero import ZeroCheckpointHook, ZeroRedundancyOptimizer

# Scopes whose packages register an optimizer as 'Adan', and the name under
# which theirs stays reachable once ours replaces it.
_SCOPES_WITH_OWN_ADAN = {"mmpretrain": "MMPretrainAdan"}


def register() -> None:
    OPTIMIZERS.register_module(name="Adan", module=Adan, force=True)
    OPTIMIZERS.register_module(name="FusedAdan", module=FusedAdan, force=True)
    OPTIMIZERS.register_module(name="ZeroRedundancyOptimizer", module=ZeroRedundancyOptimizer, force=True)
    HOOKS.register_module(name="ZeroCheckpointHook", module=ZeroCheckpointHook, force=True)
    HOOKS.register_module(name="ResumeOptimizerStateHook", module=ResumeOptimizerStateHook, force=True)
    register_checkpoint_io()
    PARAM_SCHEDULERS.register_module(name="TimmCosineLR", module=TimmCosineLR, force=True)
    PARAM_SCHEDULERS.register_module(name="TimmCosineParamScheduler", module=TimmCosineParamScheduler, force=True)
    OPTIMIZERS.build_func = build_optimizer
    enable_package_base_configs()
    for scope in _SCOPES_WITH_OWN_ADAN:
        if importlib.util.find_spec(scope) is None:
            continue
        try:
            registry = importlib.import_module(f"{scope}.registry").OPTIMIZERS
        except Exception as err:  # a broken install must not break `import adan_plugin`
            warnings.warn(f"adan_plugin: could not claim type='Adan' in scope {scope!r}: {err}",
                          RuntimeWarning, stacklevel=2)
            continue
        claim_adan(registry)


def build_optimizer(cfg, registry: Registry, default_args=None):
    """mmengine's ``build_from_cfg``, reading Adan's options as a config writes them.

    For an Adan type, an unknown option is named with the closest known one,
    and ``state_dtype='bfloat16'`` becomes ``torch.bfloat16``; any other type
    is built exactly as mmengine would.
    """
    cls = cfg.get("type") if isinstance(cfg, dict) else None
    if isinstance(cls, str):
        with registry.switch_scope_and_registry(cfg.get("_scope_")) as scoped:
            try:
                cls = scoped.get(cls)
            except RuntimeError:  # unknown name: build_from_cfg raises mmengine's own error
                cls = None
    if isinstance(cls, type) and issubclass(cls, Adan):
        options = optimizer_options_from_config(cls, {k: v for k, v in cfg.items() if k != "type"})
        cfg = type(cfg)(type=cfg["type"], **options)
    return build_from_cfg(cfg, registry, default_args)


def claim_adan(registry: Registry) -> None:
    """Make ``type='Adan'`` in ``registry``'s scope build :class:`adan_plugin.Adan`.

    A child registry fills itself lazily: its package's ``Adan`` is registered
    only when the first lookup imports the registry's locations.  Registering
    ours before that would make the package's own ``register_module`` call fail
    (the name would be taken), so ours goes in right after that import.
    """
    if getattr(registry, "_adan_plugin_claimed", False):
        _replace_theirs(registry)
        return
    import_locations = registry.import_from_location

    def import_from_location_then_claim() -> None:
        import_locations()
        _replace_theirs(registry)

    registry.import_from_location = import_from_location_then_claim
    registry.build_func = build_optimizer  # it copied the root's when it was created
    registry._adan_plugin_claimed = True
    if registry._imported:
        _replace_theirs(registry)


def _replace_theirs(registry: Registry) -> None:
    theirs = registry._module_dict.get("Adan")
    if theirs is None or theirs is Adan:
        # No own Adan (yet): lookups fall through to the root registry, where ours is.
        return
    alias = _SCOPES_WITH_OWN_ADAN.get(registry.scope) or f"{registry.scope}_Adan"
    registry._module_dict[alias] = theirs
    registry._module_dict["Adan"] = Adan
    print_log(f"adan_plugin: type='Adan' in scope '{registry.scope}' builds adan_plugin.Adan, replacing "
              f"{theirs.__module__}.{theirs.__qualname__} (still available as type='{alias}')",
              logger="current", level=logging.INFO)
