"""What Adan needs to know about distributed training.

Two layouts split a model's gradients across processes:

* DTensors (FSDP2's ``fully_shard``, tensor parallelism): every parameter,
  gradient and state is a DTensor whose local tensor is this rank's shard.
  The DTensor itself says over which mesh dimensions it is sharded, so the
  global gradient norm needs no help from the user.
* Sharded optimizers (``torch.distributed.optim.ZeroRedundancyOptimizer``):
  each rank's optimizer holds plain tensors, a disjoint subset of the model.
  Nothing in a tensor says so; the user names the group with
  ``Adan(clip_process_group=...)``: ``'world'``, a ProcessGroup, or a
  group's name (``group.group_name``).  ZeRO copies its constructor's
  keywords into its ``param_groups``, hence into its ``state_dict``, where
  a ProcessGroup object cannot be pickled; a name can.

Everything here is host-side metadata: nothing waits for the device.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]

ProcessGroupSpec = Union[None, str, "dist.ProcessGroup"]

# Exactly these types are never DTensors: step() asks per tensor, and a type
# lookup is cheaper than isinstance against a subclass.
PLAIN_TENSOR_TYPES = frozenset((Tensor, torch.nn.Parameter))


def is_dtensor(t: Tensor) -> bool:
    return type(t) not in PLAIN_TENSOR_TYPES and DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (``t`` itself for a plain tensor).

    The shard shares storage with the DTensor, so in-place updates of it are
    updates of the DTensor.
    """
    return t.to_local() if is_dtensor(t) else t


def local_tensors(*lists: Sequence[Tensor]) -> Tuple[List[Tensor], ...]:
    # is_dtensor's fast path inlined: six lists of every parameter, at every step.
    plain = PLAIN_TENSOR_TYPES
    return tuple([t if type(t) in plain else local_tensor(t) for t in ts] for ts in lists)


def any_sharded(tensors: Sequence[Tensor]) -> bool:
    """True when some DTensor in ``tensors`` is split across ranks."""
    return any(is_dtensor(t) and shard_groups(t) for t in tensors)


def check_grad_layout(param: Tensor, grad: Tensor) -> None:
    """Raise ``RuntimeError`` when a gradient's distribution does not match its parameter's.

    Adan updates each rank's shard of a parameter with the same shard of its
    gradient; a gradient that is still a partial sum (not yet reduced across
    ranks) or laid out differently would silently train on the wrong numbers.
    """
    if type(param) in PLAIN_TENSOR_TYPES and type(grad) in PLAIN_TENSOR_TYPES:
        return  # the common case, once per parameter and step
    p_is, g_is = is_dtensor(param), is_dtensor(grad)
    if p_is != g_is:
        kind = lambda t: "a DTensor" if is_dtensor(t) else "a plain tensor"  # noqa: E731
        raise RuntimeError(f"Adan: the gradient is {kind(grad)} but its parameter is {kind(param)}; "
                           "both must be DTensors (FSDP2/tensor parallel) or both plain tensors")
    if not g_is:
        return
    if any(pl.is_partial() for pl in grad.placements):
        raise RuntimeError(f"Adan: a gradient DTensor has placements {tuple(grad.placements)}: it is a partial "
                           "sum not yet reduced across ranks; reduce it (e.g. redistribute to Shard/Replicate) "
                           "before optimizer.step()")
    same_mesh = grad.device_mesh is param.device_mesh or grad.device_mesh == param.device_mesh
    if not same_mesh or tuple(grad.placements) != tuple(param.placements):
        raise RuntimeError(f"Adan: a gradient DTensor is laid out as {tuple(grad.placements)} on "
                           f"{grad.device_mesh}, its parameter as {tuple(param.placements)} on "
                           f"{param.device_mesh}; they must match")


def shard_groups(t: Tensor) -> Tuple["dist.ProcessGroup", ...]:
    """Process groups of the mesh dimensions over which the DTensor ``t`` is split.

    A sum over all elements of ``t`` is the sum of the per-rank sums over
    these groups; replicated dimensions hold copies and are not summed.
    ``_StridedShard`` (FSDP2 combined with tensor parallelism) is not a
    ``Shard`` subclass, so any placement that is not ``Replicate`` counts.
    """
    mesh = t.device_mesh
    groups = []
    for dim, placement in enumerate(t.placements):
        if not placement.is_replicate() and mesh.size(dim) > 1:
            groups.append(mesh.get_group(dim))
    return tuple(groups)


def is_process_group(obj: Any) -> bool:
    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


def check_process_group_spec(spec: ProcessGroupSpec) -> None:
    """Raise ``ValueError`` unless ``spec`` is None, 'world', a group name or a ProcessGroup."""
    if spec is None or (isinstance(spec, str) and spec) or is_process_group(spec):
        return
    raise ValueError(f"Adan: clip_process_group must be None (local norm), 'world', a process group's "
                     f"name (group.group_name) or a torch.distributed ProcessGroup, got {spec!r}")


def check_groups_picklable(param_groups: Sequence[dict]) -> None:
    """Refuse a ProcessGroup object inside ``param_groups`` (ZeRO puts it there).

    Training would work, but the first checkpoint would fail to pickle it.
    """
    for group in param_groups:
        if is_process_group(group.get("clip_process_group")):
            raise ValueError(
                "Adan: a ProcessGroup object in a parameter group (ZeroRedundancyOptimizer copies its keywords "
                "into its param_groups) would make the optimizer's state_dict unpicklable; pass its name "
                "instead: clip_process_group=group.group_name (or 'world')")


def resolve_process_group(spec: ProcessGroupSpec) -> Optional["dist.ProcessGroup"]:
    """The group named by ``spec``; raises when it needs an uninitialized default group."""
    if spec is None:
        return None
    if is_process_group(spec):
        return spec
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"Adan: clip_process_group={spec!r} needs torch.distributed to be initialized "
                           "(call torch.distributed.init_process_group first)")
    if spec == "world":
        return dist.group.WORLD
    try:
        return dist.distributed_c10d._resolve_process_group(spec)
    except (KeyError, RuntimeError, ValueError) as err:
        raise RuntimeError(f"Adan: clip_process_group={spec!r} names no process group of this process "
                           f"({err})") from None


def collective_device(group: Optional["dist.ProcessGroup"]) -> torch.device:
    """A device on which ``group`` can all-reduce (for a rank that holds no gradient)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
