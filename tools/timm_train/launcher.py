"""``--launch``: split our argv into an upstream timm train.py's argv and the Adan keys it cannot parse."""
from __future__ import annotations

from typing import Any, Dict, Sequence

from timm_train.config import ConfigError, _bool, build_parser, load_config

_ADAN_FLAGS = {"--max-grad-norm": "max_grad_norm", "--max_grad_norm": "max_grad_norm",
               "--no-prox": "no_prox", "--no_prox": "no_prox",
               "--bias-decay": "bias_decay", "--bias_decay": "bias_decay"}


def split_launch_args(argv: Sequence[str]):
    """(script, argv for the script, Adan keys) from our argv in --launch mode."""
    argv = list(argv)
    i = argv.index("--launch")
    if i + 1 >= len(argv):
        raise ConfigError("--launch needs the path of a timm train.py")
    script, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    adan: Dict[str, Any] = {}
    for j, arg in enumerate(rest):  # the recipe YAML first, the command line wins
        if arg in ("-c", "--config") and j + 1 < len(rest):
            cfg = load_config(rest[j + 1], build_parser())
            adan.update({k: cfg[k] for k in ("max_grad_norm", "no_prox", "bias_decay") if k in cfg})
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
