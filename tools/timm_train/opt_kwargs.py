"""``--opt-kwargs k=v ...``: the values as the trainer and ``--launch`` read them."""
from __future__ import annotations

import argparse
import ast
from typing import Any


def kwarg_value(text: str) -> Any:
    """An ``--opt-kwargs`` value: a Python literal, else the text itself (``state_dtype=8bit`` is ``'8bit'``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


class OptKwargs(argparse.Action):
    """``--opt-kwargs k=v ...`` as a dict.  Ours rather than timm's ``ParseKwargs``: timm 1.0.29 and
    earlier catch only ``ValueError`` from ``literal_eval``, so the documented ``state_dtype=8bit`` (a
    ``SyntaxError``) crashed the trainer there."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for pair in values:
            if not pair:
                continue
            if "=" not in pair:
                parser.error(f"{option_string}: expected key=value pairs, got {pair!r}")
            key, value = pair.split("=", 1)
            kwargs[key] = kwarg_value(value)
        setattr(namespace, self.dest, kwargs)
