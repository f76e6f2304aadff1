"""Moving Adan optimizer checkpoints between implementations.

The official Adan, timm's and ours keep ``neg_pre_grad`` (minus the previous
gradient); mmpretrain's keeps ``pre_grad`` (the gradient itself).  Our
``Adan.load_state_dict`` reads either; this module writes the one another
implementation expects.

8-bit states (``state_dtype="8bit"``: int8/uint8 codes plus ``<key>_scale``
tensors, see :mod:`adan_plugin.lowmem`) are ours alone: for every other
target they are dequantized to float32 and the scales dropped.  Our own
``Adan.load_state_dict`` converts by itself in both directions (8-bit into
float states and float into 8-bit), so ``target='adan_plugin'`` keeps them.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

from . import lowmem

TARGETS = ("adan_plugin", "official", "timm", "mmpretrain")


def convert_state_dict(state_dict: Dict[str, Any], target: str) -> Dict[str, Any]:
    """Return a copy of an Adan ``state_dict`` in ``target``'s layout.

    ``target='mmpretrain'`` adds ``pre_grad`` next to ``neg_pre_grad`` (so
    the result still loads everywhere); the other targets share our layout
    and get ``neg_pre_grad`` back from a mmpretrain checkpoint.
    """
    if target not in TARGETS:
        raise ValueError(f"convert_state_dict: unknown target {target!r}; expected one of {TARGETS}")
    out = {"state": {}, "param_groups": copy.deepcopy(state_dict["param_groups"])}
    for index, st in state_dict["state"].items():
        st = dict(st)
        if target != "adan_plugin":
            st = lowmem.dequantize_state(st)
        if "neg_pre_grad" not in st and "pre_grad" in st:
            st["neg_pre_grad"] = st["pre_grad"].neg()
        if target == "mmpretrain":
            if "neg_pre_grad" in st:
                st["pre_grad"] = st["neg_pre_grad"].neg()
        else:
            st.pop("pre_grad", None)
        out["state"][index] = st
    return out
