"""The optimizer variants timed (ours, timm's, mmpretrain's and the official sail-sg Adan, torch AdamW) and the
bytes a step moves."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

# Hyper-parameters of every Adan variant (no clipping: timm's Adan has none, and clipping would time a
# norm reduction rather than the update) and of AdamW.
ADAN_HP = dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02)
ADAMW_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.02)


# ----------------------------------------------------------------------------------------- variants
class Unavailable(Exception):
    """A variant cannot run here; the message is the reason shown in the table."""


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    make: Callable[[List[torch.Tensor]], torch.optim.Optimizer]
    compiled: bool = False
    # Its kernel is not a dispatched torch op (a pybind extension call): OpBytes would see only the
    # ops around it, so its ops' bytes are not counted.
    opaque: bool = False


def _ours(**kw):
    def make(params):
        from adan_plugin import Adan
        from adan_plugin import _ext

        if kw.get("fused_backend") == "triton":
            backend, why = _ext.select_fused_backend(params[0].device, "triton")
            if backend is None:
                raise Unavailable(why)
        options = kw
        if kw.get("fused") and kw.get("fused_backend") is None:
            if not _ext.extension_loaded():
                raise Unavailable(f"extension not built: {_ext.load_error()}")
            if not _ext.fused_supported(params[0].device):
                raise Unavailable(f"fused kernels not built for {params[0].device.type}")
            # The compiled kernel for the device, named: fused=True alone puts Triton first for 8-bit
            # states on a GPU, and these rows time our C++/CUDA kernels (Triton has its own rows).
            options = dict(kw, fused_backend=params[0].device.type)
        try:
            return Adan(params, **ADAN_HP, **options)
        except TypeError as err:  # e.g. state_dtype not (yet) an option
            raise Unavailable(f"Adan does not accept {sorted(kw)}: {err}") from err
    return make


def _timm(foreach: bool):
    def make(params):
        try:
            from timm.optim.adan import Adan as TimmAdan
        except ImportError as err:
            raise Unavailable(f"timm not installed: {err}") from err
        return TimmAdan(params, **ADAN_HP, foreach=foreach)
    return make


def _mmpretrain(params):
    try:
        from mmpretrain.engine.optimizers.adan_t import Adan as MMAdan
    except ImportError as err:
        raise Unavailable(f"mmpretrain not installed: {err}") from err
    return MMAdan(params, **ADAN_HP)  # its default foreach=True


class OfficialAdan:
    """Where the official sail-sg/Adan code lives: a directory holding its ``adan.py`` and the
    ``fused_adan`` CUDA extension built in place (``python setup.py build_ext --inplace`` there).  Its code
    stays outside this repository; the bench loads ``adan.py`` by file location, with the directory on
    ``sys.path`` so that its ``import fused_adan`` finds the extension beside it."""

    path: Optional[str] = None
    _loaded: Dict[str, object] = {}

    @classmethod
    def set_path(cls, path: Optional[str]) -> None:
        cls.path = os.path.abspath(path) if path else None

    @classmethod
    def optimizer_class(cls):
        if cls.path is None:
            raise Unavailable("no --official-adan path given")
        if cls.path in cls._loaded:
            return cls._loaded[cls.path]
        source = os.path.join(cls.path, "adan.py")
        if not os.path.isfile(source):
            raise Unavailable(f"no adan.py in --official-adan {cls.path}")
        if cls.path not in sys.path:
            sys.path.append(cls.path)  # last: its setup.py and adan.py shadow nothing
        # Without the built extension, its source folder fused_adan/ imports as an empty namespace
        # package and the step would fail later with an AttributeError; say what is missing instead.
        built = any(os.path.isfile(os.path.join(cls.path, "fused_adan" + suffix))
                    for suffix in importlib.machinery.EXTENSION_SUFFIXES)
        if os.path.isdir(os.path.join(cls.path, "fused_adan")) and not built:
            raise Unavailable(f"fused_adan extension not built in {cls.path} (python setup.py build_ext "
                              "--inplace there)")
        try:
            spec = importlib.util.spec_from_file_location("_bench_official_adan", source)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            adan = module.Adan
        except Exception as err:  # noqa: BLE001  -- whatever the foreign file raises is the reason
            raise Unavailable(f"official adan.py failed to load: {type(err).__name__}: {err}") from err
        cls._loaded[cls.path] = adan
        return adan


def _official(foreach: bool):
    def make(params):
        adan = OfficialAdan.optimizer_class()
        try:
            # Its constructor checks that fused_adan imports (ImportError naming the build step).
            return adan(params, **ADAN_HP, foreach=foreach, fused=True)
        except Exception as err:  # noqa: BLE001
            raise Unavailable(f"official FusedAdan: {type(err).__name__}: {err}") from err
    return make


def _adamw(**kw):
    def make(params):
        try:
            return torch.optim.AdamW(params, **ADAMW_HP, **kw)
        except (RuntimeError, ValueError) as err:
            raise Unavailable(str(err)) from err
    return make


VARIANTS: Dict[str, Variant] = {v.name: v for v in [
    Variant("ours-fused", "ours fused (fp32 state)", _ours(fused=True)),
    Variant("ours-fused-bf16", "ours fused (bf16 state)", _ours(fused=True, state_dtype=torch.bfloat16)),
    Variant("ours-fused-triton", "ours fused, Triton kernel (fp32 state)", _ours(fused=True, fused_backend="triton")),
    Variant("ours-fused-8bit", "ours fused, 8-bit state", _ours(fused=True, state_dtype="8bit")),
    Variant("ours-fused-triton-bf16", "ours fused, Triton kernel (bf16 state)",
            _ours(fused=True, fused_backend="triton", state_dtype=torch.bfloat16)),
    Variant("ours-fused-triton-8bit", "ours fused, Triton kernel (8-bit state)",
            _ours(fused=True, fused_backend="triton", state_dtype="8bit")),
    Variant("ours-foreach", "ours foreach", _ours(fused=False, foreach=True)),
    Variant("ours-single", "ours single-tensor", _ours(fused=False, foreach=False)),
    Variant("ours-foreach-compiled", "ours foreach, torch.compile", _ours(fused=False, foreach=True),
            compiled=True),
    Variant("timm-foreach", "timm Adan foreach", _timm(True)),
    Variant("timm-single", "timm Adan single-tensor", _timm(False)),
    Variant("mmpretrain", "mmpretrain Adan (foreach)", _mmpretrain),
    Variant("official-fused", "official FusedAdan (sail-sg, multi-tensor)", _official(foreach=True), opaque=True),
    Variant("official-fused-single", "official FusedAdan (sail-sg, single-tensor)", _official(foreach=False),
            opaque=True),
    Variant("adamw-fused", "torch AdamW fused", _adamw(fused=True)),
    Variant("adamw-foreach", "torch AdamW foreach", _adamw(foreach=True)),
]}


# ------------------------------------------------------------------------------- byte accounting
def step_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes one step must move at least: every parameter with a gradient is read and written, its
    gradient read, and every tensor in its optimizer state read and written (Adan: exp_avg, exp_avg_sq,
    exp_avg_diff, neg_pre_grad (ours, timm's, the official one) or mmpretrain's pre_grad; AdamW: exp_avg, exp_avg_sq and the step
    tensor).  Counted from the tensors the optimizer holds after a step, so a bf16 state counts 2 bytes
    per element, an 8-bit state 1 byte per element plus its fp32 per-block scales, an fp32 step tensor
    4 bytes per parameter tensor."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            total += 2 * _nbytes(p) + _nbytes(p.grad)
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value):
                    total += 2 * _nbytes(value)
    return total


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_nbytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
