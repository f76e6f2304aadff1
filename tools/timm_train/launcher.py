"""``--launch``: split our argv into an upstream timm train.py's argv and the Adan keys it cannot parse."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from timm_train.config import ConfigError, _bool, build_parser, load_config
from timm_train.opt_kwargs import kwarg_value

_ADAN_FLAGS = {"--max-grad-norm": "max_grad_norm", "--max_grad_norm": "max_grad_norm",
               "--no-prox": "no_prox", "--no_prox": "no_prox",
               "--bias-decay": "bias_decay", "--bias_decay": "bias_decay"}
_OPT_KWARGS_FLAGS = ("--opt-kwargs", "--opt_kwargs")


def _merge_opt_kwargs(argv: List[str], recipe: Dict[str, Any]) -> List[str]:
    """``argv`` with one ``--opt-kwargs``: the recipe's ``opt_kwargs``, then every occurrence of the command line.

    ``--opt-kwargs`` replaces the dict on each occurrence (ours and timm's), the recipe's
    included (a YAML's ``opt_kwargs`` is only a default): without merging, one
    ``--opt-kwargs`` on the command line would drop the recipe's ``state_dtype``.
    """
    merged, out, j = dict(recipe), [], 0
    while j < len(argv):
        flag, eq, inline = argv[j].partition("=")
        if flag not in _OPT_KWARGS_FLAGS:
            out.append(argv[j])
            j += 1
            continue
        values, j = ([inline] if eq else []), j + 1
        while not eq and j < len(argv) and not argv[j].startswith("-"):  # nargs="*": up to the next option
            values.append(argv[j])
            j += 1
        for pair in values:
            if "=" not in pair:
                raise ConfigError(f"--opt-kwargs: expected key=value pairs, got {pair!r}")
            key, value = pair.split("=", 1)
            merged[key] = kwarg_value(value)
    return out + (["--opt-kwargs"] + [f"{k}={v!r}" for k, v in merged.items()] if merged else [])


def split_launch_args(argv: Sequence[str]):
    """(script, argv for the script, Adan keys) from our argv in --launch mode."""
    argv = list(argv)
    i = argv.index("--launch")
    if i + 1 >= len(argv):
        raise ConfigError("--launch needs the path of a timm train.py")
    script, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    adan: Dict[str, Any] = {}
    recipe_kwargs: Dict[str, Any] = {}
    for j, arg in enumerate(rest):  # the recipe YAML first, the command line wins
        if arg in ("-c", "--config") and j + 1 < len(rest):
            cfg = load_config(rest[j + 1], build_parser())
            adan.update({k: cfg[k] for k in ("max_grad_norm", "no_prox", "bias_decay") if k in cfg})
            recipe_kwargs.update(cfg.get("opt_kwargs") or {})
    rest = _merge_opt_kwargs(rest, recipe_kwargs)
    out, j = [], 0
    while j < len(rest):
        key = _ADAN_FLAGS.get(rest[j].split("=", 1)[0])
        if key is None:
            out.append(rest[j])
            j += 1
            continue
        if "=" in rest[j]:
            value, j = rest[j].split("=", 1)[1], j + 1
        elif key != "max_grad_norm" and (j + 1 >= len(rest) or rest[j + 1].startswith("-")):
            value, j = "true", j + 1
        else:
            if j + 1 >= len(rest):
                raise ConfigError(f"{rest[j]} needs a value")
            value, j = rest[j + 1], j + 2
        adan[key] = float(value) if key == "max_grad_norm" else _bool(value)
    return script, out, adan
