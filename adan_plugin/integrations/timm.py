"""timm integration: Adan in timm's optimizer registry, recipe-to-optimizer
glue for the zoo YAMLs, and a launcher for an upstream timm ``train.py``.

Registered names (``import adan_plugin`` does it)::

    adan, adanw          adan_plugin.Adan (proximal / decoupled weight decay);
                         fused kernels used automatically when built (fused=None)
    cadan, cadanw        the same with timm's "cautious" masking
    fusedadan, fusedadanw
                         adan_plugin.FusedAdan: the compiled kernels or a clear error
    adan8bit, adanw8bit  adan_plugin.Adan with state_dtype="8bit" (4.06 B of state per
                         parameter instead of 16), by name: no --opt-kwargs needed
                         (timm 1.0.29's parser stops at the text "8bit"); an explicit
                         state_dtype in the options still wins

timm's own names are replaced, so ``--opt adan`` / ``create_optimizer_v2(model,
'adan')`` build our class; timm's ``lookahead_`` prefix, ``layer_decay`` and
1-d parameter grouping work unchanged because grouping happens before the
optimizer class is called.

The zoo recipes add three keys timm's ``train.py`` does not know:
``max_grad_norm`` and ``no_prox`` are Adan constructor arguments (they travel
through timm's ``opt_args`` / ``--opt-kwargs``); ``bias_decay: true`` means
weight decay on *every* parameter, 1-d ones (biases, norm weights) and the
model's ``no_weight_decay()`` list included, which is what the timm version
of the zoo runs did with grouping disabled.

Options written as text (``--opt-kwargs``, a recipe's ``opt_kwargs``) may name
Adan's ``state_dtype``: ``state_dtype=bfloat16`` is ``torch.bfloat16``, read
as mmengine configs are (:mod:`.option_values`).
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn
from timm.optim import _optim_factory as factory
from timm.optim import param_groups_layer_decay

from ..adan import Adan, FusedAdan
from .option_values import dtype_from_config

ADAN_NAMES = ("adan", "adanw", "cadan", "cadanw", "fusedadan", "fusedadanw", "adan8bit", "adanw8bit")
# Recipe keys that are Adan constructor arguments rather than timm arguments.
ADAN_OPT_ARGS = ("max_grad_norm", "no_prox")


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
        factory.OptimInfo("adan8bit", Adan, "Adan (adan_plugin) with 8-bit block-wise states, proximal weight decay",
                          defaults={"no_prox": False, "state_dtype": "8bit"}, **common),
        factory.OptimInfo("adanw8bit", Adan, "Adan (adan_plugin) with 8-bit block-wise states, decoupled weight decay",
                          defaults={"no_prox": True, "state_dtype": "8bit"}, **common),
    ]


def register(registry=None) -> None:
    registry = registry or factory.default_registry
    for info in _infos():
        # Replacing timm's own Adan is the point; drop it first so timm does
        # not log an "overwriting" warning on every import.
        registry._optimizers.pop(info.name, None)
        registry.register(info)
    if not getattr(registry.create_optimizer, "_reads_state_dtype_names", False):
        registry.create_optimizer = _reading_state_dtype_names(registry.create_optimizer)


def _reading_state_dtype_names(create_optimizer):
    """The registry's ``create_optimizer``, taking Adan's ``state_dtype`` by name as mmengine configs do.

    ``--opt-kwargs state_dtype=bfloat16`` and a recipe's ``opt_kwargs`` are
    text: ``'bfloat16'`` / ``'torch.bfloat16'`` become ``torch.bfloat16``
    (``'8bit'`` stays).  Done here rather than in the Adan classes so that
    ``get_optimizer_class('adan')`` is still ``Adan`` itself.
    """

    def create(model_or_params, opt: str, *args, **kwargs):
        if is_adan(opt) and "state_dtype" in kwargs:
            kwargs["state_dtype"] = dtype_from_config("state_dtype", kwargs["state_dtype"])
        return create_optimizer(model_or_params, opt, *args, **kwargs)

    create._reads_state_dtype_names = True
    create.__wrapped__ = create_optimizer
    return create


def base_opt_name(opt: str) -> str:
    """``'lookahead_adan'`` -> ``'adan'`` (timm's prefix convention)."""
    return opt.lower().split("_")[-1]


def is_adan(opt: str) -> bool:
    return base_opt_name(opt) in ADAN_NAMES


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def bias_decay_param_groups(model: nn.Module, weight_decay: float,
                            layer_decay: Optional[float] = None) -> List[Dict[str, Any]]:
    """Parameter groups for ``bias_decay: true``: weight decay on every trainable parameter.

    With ``layer_decay`` the groups are timm's layer-wise ones, with neither
    1-d parameters nor the ``no_weight_decay()`` list exempted.
    """
    if layer_decay is not None:
        return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=(),
                                        weight_decay_exclude_1d=False, layer_decay=layer_decay)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]


def optimizer_kwargs(cfg: Any) -> Dict[str, Any]:
    """``create_optimizer_v2`` keyword arguments for a recipe (argparse namespace or dict).

    timm's own translation (opt, lr, weight_decay, momentum, opt_eps, opt_betas,
    layer_decay, opt_args) plus the Adan keys ``max_grad_norm`` / ``no_prox``
    (only for Adan optimizers; they are not arguments of the others) and
    ``opt_kwargs`` (train.py's ``--opt-kwargs``), which wins over everything.
    """
    if isinstance(cfg, dict):
        from types import SimpleNamespace
        cfg = SimpleNamespace(**cfg)
    kwargs = factory.optimizer_kwargs(cfg)
    if is_adan(kwargs["opt"]):
        for key in ADAN_OPT_ARGS:
            value = _get(cfg, key)
            if value is not None:
                kwargs[key] = value
    if kwargs.get("betas") is not None:
        kwargs["betas"] = tuple(kwargs["betas"])
    kwargs.update(_get(cfg, "opt_kwargs") or {})
    return kwargs


def create_optimizer(model: nn.Module, cfg: Any):
    """Build the recipe's optimizer for ``model`` through timm's factory.

    ``bias_decay`` selects :func:`bias_decay_param_groups`; otherwise timm's
    grouping applies (no decay on 1-d parameters and ``no_weight_decay()``).
    """
    kwargs = optimizer_kwargs(cfg)
    if _get(cfg, "bias_decay", False):
        weight_decay, layer_decay = kwargs["weight_decay"], kwargs.pop("layer_decay", None)
        kwargs["param_group_fn"] = lambda m: bias_decay_param_groups(m, weight_decay, layer_decay)
    return factory.create_optimizer_v2(model, **kwargs)


# --------------------------------------------------------------------------- Pillow compatibility
def _posterize_any_bits(img, bits_to_keep, **_):
    """Posterize keeping ``bits_to_keep`` bits, 0 included (an all-black image), as Pillow < 11 did."""
    if bits_to_keep >= 8:
        return img
    mask = ~(2 ** (8 - max(0, int(bits_to_keep))) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def fix_randaugment_posterize() -> bool:
    """Let timm's RandAugment posterize to 0 bits under a recent Pillow; True when patched.

    The zoo's ``rand-m9-mstd0.5-inc1`` draws magnitudes up to 10, for which
    timm's increasing posterize keeps 0 bits.  Pillow of the zoo's time
    returned a black image; recent Pillow raises ``ValueError`` mid-epoch.
    """
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return False
    except ValueError:
        pass
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize_any_bits
    auto_augment.posterize = _posterize_any_bits
    return True


# --------------------------------------------------------------------------- launcher
def _patched_create_optimizer_v2(original, injected: Sequence[str] = ()):
    """``create_optimizer_v2`` that also understands ``bias_decay`` (from ``--opt-kwargs``).

    ``injected`` names the keys the launcher added on the recipe's behalf:
    they are dropped for non-Adan optimizers, which do not take them.
    """

    def create_optimizer_v2(model_or_params, opt: str = "sgd", *args, **kwargs):
        if not is_adan(opt):
            for key in injected:
                kwargs.pop(key, None)
        bias_decay = kwargs.pop("bias_decay", False)
        if bias_decay and isinstance(model_or_params, nn.Module) and not kwargs.get("param_group_fn"):
            weight_decay = kwargs.get("weight_decay", 0.0)
            layer_decay = kwargs.pop("layer_decay", None)
            kwargs["param_group_fn"] = lambda m: bias_decay_param_groups(m, weight_decay, layer_decay)
        return original(model_or_params, opt, *args, **kwargs)

    create_optimizer_v2.__wrapped__ = original
    return create_optimizer_v2


def _with_opt_kwargs(argv: Sequence[str], extra: Dict[str, Any]) -> List[str]:
    """``argv`` with ``extra`` merged into its ``--opt-kwargs`` list (added when absent).

    timm's ``ParseKwargs`` replaces the dict on every occurrence, so the pairs
    go into the user's occurrence, before the user's own (which then win).
    """
    pairs = [f"{k}={v!r}" for k, v in extra.items()]
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg in ("--opt-kwargs", "--opt_kwargs"):
            return argv[:i + 1] + pairs + argv[i + 1:]
    return argv + (["--opt-kwargs"] + pairs if pairs else [])


def launch_upstream_train(script: str, argv: Sequence[str], adan_args: Dict[str, Any]) -> None:
    """Run an upstream timm ``train.py`` unmodified, with Adan registered.

    ``adan_args`` (``max_grad_norm``, ``no_prox``, ``bias_decay`` from the
    recipe / command line) reach the optimizer through ``--opt-kwargs``;
    ``bias_decay`` is understood by the patched ``create_optimizer_v2``.
    """
    if not os.path.isfile(script):
        raise FileNotFoundError(f"--launch: no training script at {script!r}")
    import timm.optim

    fix_randaugment_posterize()
    extra = {k: v for k, v in adan_args.items() if v is not None}
    patched = _patched_create_optimizer_v2(factory.create_optimizer_v2, tuple(extra))
    timm.optim.create_optimizer_v2 = patched
    factory.create_optimizer_v2 = patched
    sys.argv = [script] + _with_opt_kwargs(argv, extra)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
