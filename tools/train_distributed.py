#!/usr/bin/env python
"""Adan in a plain PyTorch loop under DDP, ZeroRedundancyOptimizer or FSDP2.

The smallest complete example of each set-up (docs/distributed.md), on the
embedded digits (a small CNN, CPU or GPU).  One process per GPU, or per CPU
slot with gloo:

    torchrun --standalone --nproc_per_node 2 tools/train_distributed.py --strategy ddp
    torchrun --standalone --nproc_per_node 2 tools/train_distributed.py --strategy zero
    torchrun --standalone --nproc_per_node 2 tools/train_distributed.py --strategy fsdp2
    python tools/train_distributed.py --strategy none          # one process, the reference

``--batch-size`` is global: each of N ranks takes 1/N of every batch, so the
run follows the single-process one (same data order, same clipped update).
``--save DIR`` / ``--resume DIR`` write and read a checkpoint the way each
strategy needs it (rank-0 file, ZeRO's consolidate_state_dict, or
torch.distributed.checkpoint for FSDP2).  Loading reads data only: tensors and
plain values (``torch.load(weights_only=True)``; for FSDP2 DCP's metadata through
an allow-list, :mod:`adan_plugin.distributed_checkpoint`), so a checkpoint cannot
run code.  A checkpoint without optimizer state is refused unless
``--allow-fresh-optimizer-state`` says to start the moments from zero.  User
errors exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from adan_plugin import Adan
from adan_plugin.checkpoint import CheckpointError, load_checkpoint, missing_optimizer_state, save_checkpoint
from adan_plugin.data import digits_tensors


class UsageError(Exception):
    """A user error: reported as ``train_distributed.py: error: ...`` with exit status 2."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=("none", "ddp", "zero", "fsdp2"), default="ddp")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split over the ranks")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--weight-decay", type=float, default=0.02)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write a checkpoint here at the end")
    parser.add_argument("--resume", help="continue from a checkpoint written with --save")
    parser.add_argument("--allow-fresh-optimizer-state", action="store_true",
                        help="resume from a checkpoint without optimizer state (moments restart from zero)")
    return parser.parse_args(argv)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


def setup():
    """(rank, world size, device), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def build(args, world, device):
    """Model as trained (wrapped or sharded), the plain module, the optimizer."""
    torch.manual_seed(args.seed)
    module = make_model().to(device)
    hp = dict(lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm)
    if args.strategy == "none" or world == 1:
        return module, module, Adan(module.parameters(), **hp)
    if args.strategy in ("ddp", "zero"):
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(module, device_ids=[device] if device.type == "cuda" else None)
        if args.strategy == "ddp":
            # Every rank holds every (averaged) gradient: the local norm is global.
            return model, module, Adan(model.parameters(), **hp)
        from torch.distributed.optim import ZeroRedundancyOptimizer
        # Each rank's Adan holds a shard of the parameters: the clip norm must
        # be summed over the ranks (ZeRO keeps `process_group` for itself).
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Adan,
                                      clip_process_group="world", **hp)
        return model, module, opt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world,))
    for layer in module:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    # DTensor parameters: Adan finds the global norm from their placements.
    return module, module, Adan(module.parameters(), **hp)


def save(args, rank, model, module, opt, epoch):
    if args.strategy == "fsdp2" and dist.is_initialized():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(module, opt)
        # the epoch as a tensor: a non-tensor item would be pickled
        dcp.save({"model": msd, "optim": osd, "epoch": torch.tensor(epoch)}, checkpoint_id=args.save)
        return
    if args.strategy == "zero" and dist.is_initialized():
        opt.consolidate_state_dict(to=0)  # a collective: every rank calls it
    if rank == 0:
        os.makedirs(args.save, exist_ok=True)
        save_checkpoint({"model": module.state_dict(), "optim": opt.state_dict(), "epoch": epoch},
                        os.path.join(args.save, "checkpoint.pt"))
    if dist.is_initialized():
        dist.barrier()


def _epoch(value, path) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsageError(f"checkpoint {path!r}: 'epoch' must be a non-negative integer, got {value!r}")
    return value


def resume(args, model, module, opt) -> int:
    """Load ``args.resume``; return the number of epochs already done."""
    if args.strategy == "fsdp2" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from adan_plugin.distributed_checkpoint import load_distributed_checkpoint
        msd, osd = get_state_dict(module, opt)
        state = {"model": msd, "optim": osd, "epoch": torch.tensor(0)}
        load_distributed_checkpoint(state, args.resume)
        set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return _epoch(state["epoch"], args.resume)
    path = os.path.join(args.resume, "checkpoint.pt")
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or "model" not in saved:
        raise UsageError(f"checkpoint {path!r} has no 'model' state: not written by this tool's --save")
    if "epoch" not in saved:
        raise UsageError(f"checkpoint {path!r} has no 'epoch': cannot tell where to continue")
    epoch = _epoch(saved["epoch"], path)
    fresh = missing_optimizer_state(saved, "optim")
    if fresh is not None and not args.allow_fresh_optimizer_state:
        raise UsageError(f"checkpoint {path!r}: {fresh}; resuming would restart Adan's moments from zero "
                         f"(pass --allow-fresh-optimizer-state to do that on purpose)")
    try:
        module.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise UsageError(f"checkpoint {path!r} does not fit the model: {str(err).splitlines()[0]}") from None
    if fresh is None:
        # ZeRO: every rank loads the full consolidated state and keeps its shard.
        opt.load_state_dict(saved["optim"])
    else:
        warnings.warn(f"checkpoint {path!r}: {fresh}; Adan's moments start from zero "
                      f"(--allow-fresh-optimizer-state)", RuntimeWarning, stacklevel=2)
    return epoch


def main(argv=None) -> float:
    args = parse_args(argv)
    rank, world, device = setup()
    model, module, opt = build(args, world, device)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    try:
        start = resume(args, model, module, opt) if args.resume else 0
    except (CheckpointError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    x_train, y_train, x_val, y_val = (t.to(device) for t in digits_tensors())
    local = args.batch_size // world
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.time()
    top1 = float("nan")  # no epoch left to run
    for epoch in range(start, args.epochs):
        # The same permutation on every rank; rank r takes its slice of each batch.
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed + epoch))
        n_batches = len(order) // args.batch_size
        total = torch.zeros((), device=device)
        for b in range(n_batches):
            idx = order[b * args.batch_size + rank * local: b * args.batch_size + (rank + 1) * local].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            total += loss.detach()
        if dist.is_initialized():
            dist.all_reduce(total)
        with torch.no_grad():
            top1 = (model(x_val).argmax(1) == y_val).float().mean().item() * 100
        if rank == 0:
            print(f"epoch {epoch}: train_loss {total.item() / (n_batches * world):.4f}  val top-1 {top1:.2f}%  "
                  f"({args.strategy}, {world} process{'es' if world > 1 else ''}, {time.time() - t0:.1f}s)",
                  flush=True)
    if args.save:
        save(args, rank, model, module, opt, args.epochs)
    if dist.is_initialized():
        # The group goes away only once every rank is past its last collective (see dist_exit.py for
        # how the process then leaves).
        dist.barrier()
        dist.destroy_process_group()
    return top1


if __name__ == "__main__":
    from dist_exit import exit_process  # beside this script

    try:
        main()
    except UsageError as err:
        print(f"train_distributed.py: error: {err}", file=sys.stderr, flush=True)
        exit_process(2)
    exit_process(0)
