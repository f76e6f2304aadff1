"""No checkpoint file runs code, and a bad one is refused with an error that names it.

A payload whose ``__reduce__`` runs a shell command (``touch MARKER``) is planted in every position a
loader of the project reads: a whole ``torch.save`` file (zip and legacy formats, a raw pickle), a
DCP folder's ``.metadata``, a DCP data file's non-tensor item and tensor item.  Each load must fail
naming the file, and the marker must not exist afterwards.  Empty, truncated and missing files give
a reason; an interrupted save leaves neither a partial file nor a temporary one.
"""
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo

from adan_plugin.checkpoint import CheckpointError, load_checkpoint, missing_optimizer_state, save_checkpoint
from adan_plugin.distributed_checkpoint import load_distributed_checkpoint, read_metadata_file
from hostile import CodeRunningPickle


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code_ran"
    yield path
    assert not path.exists(), "a checkpoint ran code"


def test_the_payload_does_run_when_unpickled(tmp_path):
    # the planted files below are real exploits: plain unpickling runs them
    path = tmp_path / "ran"
    pickle.loads(pickle.dumps(CodeRunningPickle(path)))
    assert path.exists()


def _writers(marker):
    evil = {"state_dict": {"w": torch.zeros(2)}, "epoch": 0, "args": CodeRunningPickle(marker)}
    return {
        "zip": lambda p: torch.save(evil, p),
        "legacy": lambda p: torch.save(evil, p, _use_new_zipfile_serialization=False),
        "raw-pickle": lambda p: p.write_bytes(pickle.dumps(evil)),
        "bare-payload": lambda p: torch.save(CodeRunningPickle(marker), p),
    }


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle", "bare-payload"])
def test_load_checkpoint_refuses_code_and_names_the_file(tmp_path, marker, fmt):
    path = tmp_path / f"evil-{fmt}.pth"
    _writers(marker)[fmt](path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_load_checkpoint_reasons(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(1000.0)}, good)
    assert torch.equal(load_checkpoint(good)["w"], torch.arange(1000.0))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth.*empty \(0 bytes\)"):
        load_checkpoint(empty)
    data = good.read_bytes()
    for cut in (1, 100, len(data) // 2, len(data) - 10):
        truncated = tmp_path / f"cut{cut}.pth"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}.pth.*\({cut} bytes\) cannot be read: truncated"):
            load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_save_checkpoint_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"w": torch.ones(3)}, path)
    big = {"w": torch.zeros(100_000), "bad": Unpicklable()}  # fails after writing part of the file
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(big, path)
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))  # the previous checkpoint, intact


@pytest.mark.parametrize("ckpt, problem", [
    ({"epoch": 1}, "no optimizer state"),
    ({"optimizer": {"state": {}, "param_groups": [{"step": 12, "lr": 1.0}]}}, "empty although it counts 12"),
    ({"optimizer": {"state": {}, "param_groups": [{"step": torch.tensor(3.0)}]}}, "counts 3 steps"),
    ({"optimizer": [1, 2]}, "not an optimizer state_dict"),
])
def test_missing_optimizer_state(ckpt, problem):
    assert problem in missing_optimizer_state(ckpt)


def test_an_optimizer_state_is_not_missing():
    assert missing_optimizer_state({"optimizer": {"state": {0: {"exp_avg": torch.zeros(1)}},
                                                  "param_groups": [{"step": 3}]}}) is None
    assert missing_optimizer_state({"optimizer": {"state": {}, "param_groups": [{"step": 0}]}}) is None


# ---------------------------------------------------------------- torch.distributed.checkpoint
def _template():
    return {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(4)}, "epoch": torch.tensor(0), "lr": 0.0}


@pytest.fixture
def dcp_dir(tmp_path):
    path = tmp_path / "dcp"
    dcp.save({"model": {"w": torch.randn(4, 3), "b": torch.randn(4)}, "epoch": torch.tensor(7), "lr": 0.25},
             checkpoint_id=str(path))
    return path


def _read_metadata(path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # our own file, trusted by the test


def _plant_in_data_file(path, fqn, blob):
    """Point item ``fqn`` at ``blob``, appended to its data file (as a hostile writer could)."""
    metadata = _read_metadata(path)
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    data_file = path / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(blob)
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(blob))
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return data_file


def test_dcp_round_trip(dcp_dir):
    state = _template()
    load_distributed_checkpoint(state, dcp_dir)
    assert int(state["epoch"]) == 7 and state["lr"] == 0.25 and state["model"]["w"].abs().sum() > 0


def test_dcp_metadata_with_code_is_refused(dcp_dir, marker):
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(CodeRunningPickle(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata.*refused.*posix\.system|\.metadata.*refused.*os"):
        load_distributed_checkpoint(_template(), dcp_dir)


def test_dcp_metadata_with_code_inside_a_metadata_record_is_refused(dcp_dir, marker):
    metadata = _read_metadata(dcp_dir)
    metadata.planner_data = {"x": CodeRunningPickle(marker)}
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        read_metadata_file(dcp_dir / ".metadata")


@pytest.mark.parametrize("fqn", ["lr", "epoch", "model.w"])
def test_dcp_data_item_with_code_is_refused_naming_the_data_file(dcp_dir, marker, fqn):
    import io
    blob = io.BytesIO()
    torch.save(CodeRunningPickle(marker), blob)
    data_file = _plant_in_data_file(dcp_dir, fqn, blob.getvalue())
    with pytest.raises(CheckpointError) as info:
        load_distributed_checkpoint(_template(), dcp_dir)
    assert str(data_file) in str(info.value) and "could run code" in str(info.value)


def test_dcp_plain_loader_would_run_the_planted_item(dcp_dir, tmp_path):
    # what the tools did before: torch's default planner unpickles non-tensor items fully
    import io
    ran = tmp_path / "ran"
    blob = io.BytesIO()
    torch.save(CodeRunningPickle(ran), blob)
    _plant_in_data_file(dcp_dir, "lr", blob.getvalue())
    dcp.load(_template(), checkpoint_id=str(dcp_dir))
    assert ran.exists()


def test_dcp_truncated_data_file(dcp_dir):
    data_file = next(dcp_dir.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=rf"{data_file.name}.*cannot be read: truncated"):
        load_distributed_checkpoint(_template(), dcp_dir)


def test_dcp_empty_truncated_and_missing(dcp_dir, tmp_path):
    meta = dcp_dir / ".metadata"
    data = meta.read_bytes()
    meta.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"\.metadata.*truncated"):
        load_distributed_checkpoint(_template(), dcp_dir)
    meta.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\.metadata.*empty"):
        load_distributed_checkpoint(_template(), dcp_dir)
    with pytest.raises(CheckpointError, match="nowhere.*not a folder"):
        load_distributed_checkpoint(_template(), tmp_path / "nowhere")
