"""Run bookkeeping: seeding, rank-0 logging, distributed setup, the dataset root, the model, the output folder."""
from __future__ import annotations

import difflib
import os
import random
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import torch

from timm_train.config import ConfigError


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(args, epoch: int) -> int:
    # Every epoch reseeds all RNGs from (seed, epoch, rank), so a resumed run
    # draws the same augmentations and dropout masks as an uninterrupted one.
    return args.seed + 10007 * (epoch + 1) + 101 * args.rank


def plain(value: Any) -> Any:
    """YAML/checkpoint-safe copy: tuples to lists, only builtin types."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def fmt_time(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0, seconds))))


def is_main(args) -> bool:
    return args.rank == 0


def log(args, msg: str) -> None:
    if is_main(args):
        print(msg, flush=True)


def setup_distributed(args) -> torch.device:
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.rank = int(os.environ.get("RANK", 0))
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = args.world_size > 1
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA GPU is available")
    if args.distributed:
        import torch.distributed as dist
        backend = "nccl" if want.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if want.startswith("cuda"):
        device = torch.device("cuda", args.local_rank if args.distributed else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device(want)
    return device


def resolve_data_dir(args) -> str:
    if args.data_dir:
        if not os.path.isdir(args.data_dir):
            raise ConfigError(f"data dir {args.data_dir!r} does not exist (or is not a folder)")
        return args.data_dir
    if args.dataset:
        raise ConfigError(f"--dataset {args.dataset!r} needs --data-dir")
    from adan_plugin.data import write_digits_imagefolder
    size = args.img_size or (args.input_size[-1] if args.input_size else 32)
    if args.distributed:
        import torch.distributed as dist
        root = write_digits_imagefolder(size=size) if is_main(args) else None
        dist.barrier()
        root = write_digits_imagefolder(size=size)
    else:
        root = write_digits_imagefolder(size=size)
    log(args, f"no --data-dir: using the embedded digits ImageFolder at {root}")
    return str(root)


def create_model(args, num_classes: int):
    import timm
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        raise ConfigError(f"unknown model {args.model!r}" + (f"; close names: {', '.join(close)}" if close else
                                                             "; see timm.list_models()"))
    kwargs = dict(pretrained=args.pretrained, num_classes=num_classes, drop_rate=args.drop,
                  drop_path_rate=args.drop_path, drop_block_rate=args.drop_block, global_pool=args.gp,
                  bn_momentum=args.bn_momentum, bn_eps=args.bn_eps)
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    size = args.img_size or (args.input_size[-1] if args.input_size else None)
    if size is not None:
        try:  # models with a fixed-size embedding (ViT) take img_size; CNNs do not
            return timm.create_model(args.model, img_size=size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(args.model, **kwargs)


def output_dir_for(args) -> str:
    if args.output:
        out = os.path.join(args.output, args.experiment) if args.experiment else args.output
    else:
        name = args.experiment or "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), args.model])
        out = os.path.join("output", "train", name)
    return out
