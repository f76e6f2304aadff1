"""Loading ``torch.distributed.checkpoint`` (DCP) folders without running code from them.

DCP's own file-system reader unpickles the folder's ``.metadata`` with ``pickle.load``,
and its default load planner rebuilds every non-tensor item (an epoch counter, an
optimizer's ``lr``, ``betas`` ...) with ``torch.load(weights_only=False)``: a crafted
checkpoint folder runs any code it likes when it is loaded.  Here

* :class:`SafeFileSystemReader` reads ``.metadata`` with an unpickler that builds only
  DCP's own metadata classes (and the few torch values they hold: sizes, dtypes,
  layouts, memory formats), and names the file it refuses;
* :class:`SafeLoadPlanner` rebuilds non-tensor items with ``torch.load(weights_only=True)``
  (tensors are read that way by DCP already);
* a failure in a data file names that file.

``load_distributed_checkpoint(state, path)`` is ``dcp.load`` with both.  Writers should
keep non-tensor items tensors (``torch.tensor(epoch)``) or plain numbers and strings.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import os
import pathlib
import pickle
from typing import Any, Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from .checkpoint import CheckpointError, _first_reason, _is_refusal


def _metadata_classes() -> Dict[tuple, Any]:
    """(module, name) -> object for every global a DCP ``.metadata`` may name."""
    allowed: Dict[tuple, Any] = {}
    module = dcp_metadata.__name__
    for name, obj in vars(dcp_metadata).items():
        # DCP's metadata records: dataclasses and enums defined in that module
        if isinstance(obj, type) and obj.__module__ == module and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            allowed[(module, name)] = obj
    allowed[(_StorageInfo.__module__, _StorageInfo.__name__)] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name, obj in vars(torch).items():
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = obj
    # maps a layout's name to the layout object, nothing else
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    # StorageMeta.checkpoint_id keeps the path the checkpoint was saved to
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata, refuses any other global (functions, classes, modules)."""

    _allowed: Optional[Dict[tuple, Any]] = None

    def find_class(self, module: str, name: str) -> Any:
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _metadata_classes()
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not a DCP metadata type")
        return obj


def read_metadata_file(path: os.PathLike) -> dcp_metadata.Metadata:
    """Unpickle a DCP ``.metadata`` file through the allow-list; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint metadata {path!r} does not exist: not a "
                              f"torch.distributed.checkpoint folder")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint metadata {path!r} is empty (0 bytes): an interrupted save?")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint metadata {path!r} is refused: {err}; it could run code "
                              f"when loaded") from None
    except Exception as err:
        raise CheckpointError(f"checkpoint metadata {path!r} cannot be read: truncated or corrupted "
                              f"({type(err).__name__}: {_first_reason(err)})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"checkpoint metadata {path!r} holds a {type(metadata).__name__}, "
                              f"not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata and data cannot run code; its errors name the file."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata_file(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        # One file at a time, so that an error can say which file it came from.
        per_file: Dict[str, List[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        future = None
        for relative_path, items in per_file.items():
            path = os.fspath(self.fs.concat_path(self.path, relative_path))
            try:
                future = super().read_data(dataclasses.replace(plan, items=items), planner)
                future.wait()
            except CheckpointError as err:
                raise CheckpointError(f"checkpoint data file {path!r}: {err}") from None
            except Exception as err:
                if _is_refusal(err):  # a tensor item that is not a tensor
                    raise CheckpointError(f"checkpoint data file {path!r} is refused: it asks for objects "
                                          f"other than tensors and plain data, which could run code "
                                          f"({_first_reason(err)})") from None
                raise CheckpointError(f"checkpoint data file {path!r} cannot be read: truncated or "
                                      f"corrupted ({type(err).__name__}: {_first_reason(err)})") from None
        if future is None:
            future = super().read_data(plan, planner)
        return future


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that rebuilds non-tensor items as data only (``weights_only=True``)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"item {read_item.dest_index.fqn!r} is refused: it asks for objects other "
                                  f"than tensors and plain data, which could run code "
                                  f"({_first_reason(err)})") from None
        # DefaultLoadPlanner.load_bytes, with the object built above
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_distributed_checkpoint(state_dict: Dict[str, Any], path: os.PathLike, **kwargs: Any) -> None:
    """``torch.distributed.checkpoint.load(state_dict, checkpoint_id=path)``, reading data only."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is not a folder written by torch.distributed.checkpoint")
    # Read (and so check) the metadata here first: DCP would fold our error into a generic one.
    metadata = os.path.join(path, ".metadata")
    if os.path.exists(metadata) or not any(name.endswith(".metadata") for name in os.listdir(path)):
        read_metadata_file(metadata)
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as err:
        # DCP gathers each rank's exception; ours says which file and why
        for failure in err.failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, CheckpointError):
                raise CheckpointError(str(cause)) from None
        raise
