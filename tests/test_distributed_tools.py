"""The training tools on 2 processes: ``torchrun --nproc_per_node 2`` on CPU/gloo.

tools/train_timm.py (DDP) and tools/train_mm.py (DDP, and ZeRO with Adan) run their
tiny digits configs for one epoch; tools/train_distributed.py runs ZeRO and
FSDP2 and must reproduce its single-process run.  ``--standalone`` makes
torchrun pick a free port, so runs of other test sessions cannot collide.
"""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from hostile import CodeRunningPickle

pytestmark = pytest.mark.slow

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def digits_root():
    from adan_plugin.data import write_digits_imagefolder
    return str(write_digits_imagefolder())


def _run(args, tmp_path, env_extra=None, nproc=2):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd + args)} failed:\n{out[-4000:]}"
    return out


def test_train_timm_digits_on_two_processes(tmp_path, digits_root):
    out_dir = tmp_path / "out"
    log = _run([os.path.join(REPO_ROOT, "tools", "train_timm.py"),
                "--config", os.path.join(REPO_ROOT, "configs", "timm", "demo", "digits_test_resnet.yaml"),
                "--data-dir", digits_root, "--epochs", "1", "--plot", "false", "--output", str(out_dir)],
               tmp_path)
    # 64 images per process, 2 processes: the global batch says both trained.
    assert "global batch 128" in log, log[-3000:]
    with open(out_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["eval_top1"]) > 0, rows


ZERO_OPTIONS = ["optim_wrapper.optimizer.type=ZeroRedundancyOptimizer", "optim_wrapper.optimizer.optimizer_type=Adan"]


@pytest.mark.parametrize("options", [[], ZERO_OPTIONS], ids=["ddp", "zero"])
def test_train_mm_digits_on_two_processes(tmp_path, digits_root, options):
    from adan_plugin.integrations.mmengine_safe_globals import mmengine_safe_globals

    work = tmp_path / "work"
    log = _run([os.path.join(REPO_ROOT, "tools", "train_mm.py"),
                os.path.join(REPO_ROOT, "configs", "mmpretrain", "lenet5_adan_digits.py"),
                "--launcher", "pytorch", "--work-dir", str(work), "--cfg-options", "train_cfg.max_epochs=1",
                *options],
               tmp_path, env_extra={"ADAN_DIGITS_ROOT": digits_root})
    assert "Distributed training: True" in log
    assert re.search(r"Epoch\(val\) \[1\]\[\d+/\d+\]\s+accuracy/top1", log), log[-3000:]
    with mmengine_safe_globals():
        ckpt = torch.load(work / "epoch_1.pth", map_location="cpu", weights_only=True)
    optim = ckpt["optimizer"]
    n_params = len(ckpt["state_dict"])
    # Every parameter has its Adan state (under ZeRO: both ranks' shards were gathered).
    assert len(optim["state"]) == n_params and all("exp_avg_diff" in s for s in optim["state"].values())
    if options:
        assert {g["clip_process_group"] for g in optim["param_groups"]} == {"world"}


def _final_epoch(log):
    match = re.findall(r"train_loss ([\d.]+)\s+val top-1 ([\d.]+)%", log)
    assert match, log[-3000:]
    return tuple(float(v) for v in match[-1])


def test_train_distributed_zero_and_fsdp2_follow_single_process(tmp_path):
    script = os.path.join(REPO_ROOT, "tools", "train_distributed.py")
    common = ["--epochs", "1", "--max-grad-norm", "0.5"]
    loss, top1 = _final_epoch(_run([script, "--strategy", "none", *common], tmp_path, nproc=1))
    for strategy in ("zero", "fsdp2"):
        got_loss, got_top1 = _final_epoch(_run([script, "--strategy", strategy, *common], tmp_path))
        assert got_loss == pytest.approx(loss, abs=2e-4), strategy
        assert got_top1 == pytest.approx(top1, abs=0.3), strategy   # one validation image is 0.28%


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_keeps_buffered_output_atexit_handlers_and_the_exit_code(world_size):
    # A torchrun worker leaves through os._exit (no interpreter finalization): its exit code, what it
    # printed into a pipe's buffer (Python's and libc's) and its atexit handlers must survive that; a
    # single process exits normally.
    code = ("import sys, ctypes; sys.path.insert(0, sys.argv[1]); from dist_exit import exit_process; "
            "import atexit; atexit.register(lambda: print('|atexit', end=''));"
            "print('|trained', end=''); libc = ctypes.CDLL(None);"
            "libc.printf(b'|from C'); exit_process(3)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as usual
    env["WORLD_SIZE"] = world_size
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(REPO_ROOT, "tools")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert sorted(proc.stdout.split("|")[1:]) == ["atexit", "from C", "trained"]


def _run_failing(args, tmp_path, nproc):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(cmd + args, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stdout + proc.stderr


def test_train_distributed_resume_runs_no_code_from_a_checkpoint(tmp_path):
    """FSDP2 (DCP: .metadata and a non-tensor item planted) and the single-file strategies."""
    import io
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    script = os.path.join(REPO_ROOT, "tools", "train_distributed.py")
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "fsdp2"
    _run([script, "--strategy", "fsdp2", "--epochs", "1", "--save", str(ckpt)], tmp_path)
    # the untouched checkpoint resumes (epoch kept as a tensor item), at epoch 1
    out = _run([script, "--strategy", "fsdp2", "--epochs", "2", "--resume", str(ckpt)], tmp_path)
    assert "epoch 1:" in out and "epoch 0:" not in out, out[-3000:]
    meta_path = ckpt / ".metadata"
    good_meta = meta_path.read_bytes()
    # 1. .metadata itself
    meta_path.write_bytes(pickle.dumps(CodeRunningPickle(marker)))
    code, out = _run_failing([script, "--strategy", "fsdp2", "--epochs", "2", "--resume", str(ckpt)], tmp_path, 2)
    assert code != 0 and str(meta_path) in out and "could run code" in out, out[-3000:]
    assert not marker.exists()
    # 2. an optimizer hyper-parameter (a non-tensor item) in the data file
    metadata = pickle.loads(good_meta)
    index = next(i for i in metadata.storage_data if i.fqn.endswith(".lr"))
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save(CodeRunningPickle(marker), blob)
    data_file = ckpt / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(blob.getvalue())
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(blob.getvalue()))
    meta_path.write_bytes(pickle.dumps(metadata))
    code, out = _run_failing([script, "--strategy", "fsdp2", "--epochs", "2", "--resume", str(ckpt)], tmp_path, 2)
    assert code != 0 and str(data_file) in out and "could run code" in out, out[-3000:]
    assert not marker.exists()
    # 3. the single-file checkpoint of none/ddp/zero
    single = tmp_path / "single"
    single.mkdir()
    torch.save({"model": {}, "optim": {}, "epoch": CodeRunningPickle(marker)}, single / "checkpoint.pt")
    code, out = _run_failing([script, "--strategy", "none", "--epochs", "2", "--resume", str(single)], tmp_path, 1)
    assert code == 2 and str(single / "checkpoint.pt") in out and "Traceback" not in out, out[-3000:]
    assert not marker.exists()


def test_train_distributed_resume_needs_optimizer_state_and_an_epoch(tmp_path):
    script = os.path.join(REPO_ROOT, "tools", "train_distributed.py")
    ckpt = tmp_path / "ckpt"
    _run([script, "--strategy", "none", "--epochs", "1", "--save", str(ckpt)], tmp_path, nproc=1)
    saved = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    for edit, reason in ((lambda c: c.pop("optim"), "no optimizer state"),
                         (lambda c: c["optim"].update(state={}), "empty although it counts"),
                         (lambda c: c.pop("epoch"), "no 'epoch'")):
        tampered = {k: v for k, v in saved.items()}
        tampered["optim"] = dict(saved["optim"])
        edit(tampered)
        torch.save(tampered, ckpt / "checkpoint.pt")
        code, out = _run_failing([script, "--strategy", "none", "--epochs", "2", "--resume", str(ckpt)], tmp_path, 1)
        assert code == 2 and reason in out and "Traceback" not in out, out[-3000:]
    tampered = dict(saved)
    tampered.pop("optim")
    torch.save(tampered, ckpt / "checkpoint.pt")
    out = _run([script, "--strategy", "none", "--epochs", "2", "--resume", str(ckpt),
                "--allow-fresh-optimizer-state"], tmp_path, nproc=1)
    assert "moments start from zero" in out and "epoch 1:" in out
