#!/usr/bin/env python
"""mmpretrain's training entry with adan_plugin registered.

Same command line as mmpretrain's ``tools/train.py`` (its own argument parser and
config merging are used, loaded from the mmpretrain installation):

    python tools/train_mm.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                             [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi] ...
    torchrun --nproc-per-node 2 tools/train_mm.py CONFIG --launcher pytorch

On top of mmpretrain's script it

* registers ``Adan``/``FusedAdan`` and the registry-aware ``ZeroRedundancyOptimizer``
  (``import adan_plugin``) before the config is read, so configs may name them without
  ``custom_imports`` and may inherit ``mmpretrain::_base_/...`` configs;
* resumes on torch >= 2.6: checkpoints are still loaded with ``weights_only=True``, with
  exactly the objects mmengine checkpoints contain allow-listed
  (:mod:`adan_plugin.integrations.mmengine_safe_globals`), and saved atomically;
* refuses ``--resume`` from a checkpoint without optimizer state (mmengine would restart
  the moments from zero) unless ``--allow-fresh-optimizer-state`` is given
  (``ResumeOptimizerStateHook``);
* adds ``ZeroCheckpointHook`` when the optimizer is ``ZeroRedundancyOptimizer`` (mmengine saves
  checkpoints on rank 0 only, gathering ZeRO's shards needs every rank);
* runs multi-process on CPU-only machines: with no CUDA device it uses the gloo backend
  and CPU DistributedDataParallel (mmengine alone would call ``torch.cuda.set_device``);
* writes the digits ImageFolder when a config names it in ``digits_imagefolder``
  (configs/mmpretrain/lenet5_adan_digits.py, the quick start).

A checkpoint that cannot be used (missing, empty, truncated, holding objects that could
run code, without optimizer state or with one the optimizer refuses) ends the run with one
error line and exit status 2.
"""
from __future__ import annotations

import importlib.util
import os
import os.path as osp
import sys
import time

import torch
import torch.distributed as dist

import adan_plugin  # noqa: F401  (registers Adan, FusedAdan, ZeroRedundancyOptimizer with mmengine)
from adan_plugin.checkpoint import CheckpointError
from adan_plugin.integrations.mmengine_safe_globals import mmengine_safe_globals

DIGITS_WAIT_S = 600


def load_mmpretrain_train_script():
    """mmpretrain's ``tools/train.py`` as a module (its ``parse_args`` and ``merge_args``)."""
    spec = importlib.util.find_spec("mmpretrain")
    if spec is None or spec.origin is None:
        raise SystemExit("train_mm.py: mmpretrain is not installed (pip install mmpretrain)")
    package_dir = osp.dirname(spec.origin)
    candidates = [osp.join(package_dir, ".mim", "tools", "train.py"),  # wheel
                  osp.join(osp.dirname(package_dir), "tools", "train.py")]  # source checkout
    for path in candidates:
        if osp.isfile(path):
            module_spec = importlib.util.spec_from_file_location("_mmpretrain_train", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    raise SystemExit(f"train_mm.py: mmpretrain's tools/train.py not found (looked in {candidates})")


def ensure_digits(root: str) -> None:
    """Write the digits ImageFolder once; other local ranks wait for it."""
    from adan_plugin.data import write_digits_imagefolder
    from adan_plugin.data.digits import _DONE_MARKER

    marker = osp.join(root, _DONE_MARKER)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        write_digits_imagefolder(root)
        return
    deadline = time.monotonic() + DIGITS_WAIT_S
    while not osp.exists(marker):
        if time.monotonic() > deadline:
            raise SystemExit(f"train_mm.py: local rank 0 did not finish writing {root} in {DIGITS_WAIT_S} s")
        time.sleep(0.5)


def use_cpu_distributed(cfg) -> None:
    """gloo + CPU DDP when processes are launched on a machine without CUDA."""
    env_cfg = cfg.setdefault("env_cfg", {})
    dist_cfg = env_cfg.setdefault("dist_cfg", {})
    if str(dist_cfg.get("backend", "nccl")).lower() == "nccl":
        dist_cfg["backend"] = "gloo"
    if cfg.launcher == "pytorch" and not dist.is_initialized():
        # mmengine's own init calls torch.cuda.set_device first; torchrun's env has the rest.
        dist.init_process_group(backend=dist_cfg["backend"])
    wrapper = cfg.get("model_wrapper_cfg") or {}
    if wrapper.get("type", "MMDistributedDataParallel") == "MMDistributedDataParallel":
        # A CPU module takes no device_ids; mmengine would pass [LOCAL_RANK].
        cfg.model_wrapper_cfg = dict(wrapper, type="MMDistributedDataParallel", device_ids=None)


def add_zero_checkpoint_hook(cfg) -> None:
    """ZeRO shards must be gathered on every rank before the rank-0-only checkpoint save."""
    optimizer = (cfg.get("optim_wrapper") or {}).get("optimizer") or {}
    if optimizer.get("type") not in ("ZeroRedundancyOptimizer", "mmengine.ZeroRedundancyOptimizer"):
        return
    hooks = list(cfg.get("custom_hooks") or [])
    if not any(h.get("type") == "ZeroCheckpointHook" for h in hooks):
        cfg.custom_hooks = hooks + [dict(type="ZeroCheckpointHook")]


def add_resume_check_hook(cfg, allow_fresh: bool) -> None:
    """Resuming must bring the optimizer's moments back (or be told they restart)."""
    hooks = [h for h in (cfg.get("custom_hooks") or []) if h.get("type") != "ResumeOptimizerStateHook"]
    cfg.custom_hooks = hooks + [dict(type="ResumeOptimizerStateHook", allow_fresh=allow_fresh)]


FRESH_FLAG = "--allow-fresh-optimizer-state"


def main() -> int:
    mm_train = load_mmpretrain_train_script()
    allow_fresh = FRESH_FLAG in sys.argv
    sys.argv = [a for a in sys.argv if a != FRESH_FLAG]  # mmpretrain's parser does not know it
    args = mm_train.parse_args()

    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    cfg = Config.fromfile(args.config)
    cfg = mm_train.merge_args(cfg, args)

    if cfg.get("digits_imagefolder"):
        ensure_digits(cfg.digits_imagefolder)
    if cfg.launcher != "none" and not torch.cuda.is_available():
        use_cpu_distributed(cfg)
    add_zero_checkpoint_hook(cfg)
    add_resume_check_hook(cfg, allow_fresh)

    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    if runner.optim_wrapper is not None:  # built before train() (which keeps it) to log the fused backends once
        runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
        optimizer = getattr(runner.optim_wrapper, "optimizer", None)
        runner.logger.info(f"optimizer fused backends: {getattr(optimizer, 'fused_backends', 'n/a')}")
    try:
        with mmengine_safe_globals():
            runner.train()
    except (CheckpointError, FileNotFoundError) as err:
        print(f"train_mm.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    # mmengine leaves the process group alive; a gloo group torn down by the
    # interpreter's exit can abort a rank after training finished ("terminate
    # called without an active exception"), failing the whole torchrun job.
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from dist_exit import exit_process  # beside this script

    exit_process(main() or 0)
