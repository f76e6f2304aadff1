"""Global gradient-norm clipping computed on the device.

The official and mmpretrain Adans call ``.item()`` on the clip coefficient
every step; here the coefficient stays a 0-dim device tensor that the update
multiplies in, so ``step()`` never waits for the device.

"Global" means over the whole model, also when the model is split across
processes: DTensor gradients (FSDP2) are summed over the mesh dimensions
they are sharded on, and plain gradients over ``process_group`` when a
sharded optimizer (ZeRO) gives each rank only part of them.  Both sums are
all-reduces of one scalar, queued on the device like any other kernel.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import collective_device, is_dtensor, shard_groups


# ATen's CPU norm with an output dtype (fp32 for 16-bit gradients) first converts the whole tensor: a
# gradient-sized fp32 copy.  The norms of chunk views bound that copy to one chunk (1 MiB); the CUDA
# kernel converts in registers and needs no chunks.
_CPU_NORM_CHUNK = 1 << 18


def _norm_pieces(g: Tensor) -> List[Tensor]:
    if g.device.type != "cpu" or g.element_size() >= 4 or g.numel() <= _CPU_NORM_CHUNK or not g.is_contiguous():
        return [g]
    return list(g.view(-1).split(_CPU_NORM_CHUNK))


def _local_sq_norm(tensors: List[Tensor], device: torch.device) -> Tensor:
    """Sum of squares of plain tensors, per device in fp32, moved to ``device``."""
    by_device: Dict[Tuple[torch.device, bool], List[Tensor]] = defaultdict(list)
    for g in tensors:
        if torch.is_complex(g):
            g = torch.view_as_real(g)
        by_device[(g.device, g.dtype == torch.float64)].extend(_norm_pieces(g))
    total = torch.zeros((), dtype=torch.float32, device=device)
    for (_, fp64), dev_tensors in by_device.items():
        # fp32 accumulation, so that fp16/bf16 gradients do not overflow;
        # fp64 gradients keep fp64 (the total then becomes fp64).
        norms = torch._foreach_norm(dev_tensors, 2, dtype=torch.float64 if fp64 else torch.float32)
        part = torch.linalg.vector_norm(torch.stack(norms)).square()
        # A non-blocking copy into host memory could be read before it lands.
        total = total + part.to(device, non_blocking=device.type != "cpu")
    return total


def _all_reduce_sum(value: Tensor, groups: Tuple["dist.ProcessGroup", ...]) -> Tensor:
    for group in groups:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def grad_sq_norm(grads: Iterable[Tensor], device: Optional[torch.device] = None,
                 process_group: Optional["dist.ProcessGroup"] = None) -> Tensor:
    """Sum of squares of every element of ``grads``, as a 0-dim fp32 tensor.

    Args:
        grads: plain tensors and/or DTensors.  A DTensor counts with its global
            extent: the squares of the local shards are all-reduced over the
            mesh dimensions it is sharded on (not over replicated ones).
        device: where the result lives (default: the first gradient's local
            device, else a device ``process_group`` can reduce on, else CPU).
        process_group: when given, the plain gradients are one rank's share of
            a model sharded over this group (ZeRO), and their sum of squares is
            all-reduced over it.  Every rank of the group must call this, with
            or without gradients.  DTensor gradients are not affected by it:
            they carry their own sharding.

    All ranks must pass gradients with the same DTensor layouts in the same
    order (they do under FSDP2), since the all-reduces are issued in that order.
    """
    plain: List[Tensor] = []
    by_layout: Dict[tuple, List[Tensor]] = {}
    for g in grads:
        if is_dtensor(g):
            by_layout.setdefault((g.device_mesh, tuple(g.placements)), []).append(g)
        else:
            plain.append(g)
    # One all-reduce per distinct set of shard groups, not one per gradient.
    sharded: Dict[Tuple["dist.ProcessGroup", ...], List[Tensor]] = {}
    for same_layout in by_layout.values():
        sharded.setdefault(shard_groups(same_layout[0]), []).extend(g.to_local() for g in same_layout)
    if device is None:
        first = plain[0] if plain else next((ts[0] for ts in sharded.values()), None)
        if first is not None:
            device = first.device
        elif process_group is not None:
            device = collective_device(process_group)
        else:
            device = torch.device("cpu")

    total = _local_sq_norm(plain, device)
    if process_group is not None and dist.get_world_size(process_group) > 1:
        _all_reduce_sum(total, (process_group,))
    for groups, local_shards in sharded.items():
        total = total + _all_reduce_sum(_local_sq_norm(local_shards, device), groups)
    return total


def clip_coefficient(sq_norm: Tensor, max_norm: float, eps: float) -> Tensor:
    """``min(1, max_norm / (sqrt(sq_norm) + eps))`` without leaving the device."""
    return (max_norm / (sq_norm.sqrt() + eps)).clamp_(max=1.0)
