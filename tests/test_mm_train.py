"""The digits config trained by a real mmengine Runner, resumed, and launched by three entry points.

- in process: 1 epoch, the loss falls; 1 epoch + resume gives the run that never stopped;
- resume loads with weights_only=True through the loader the registration installs (plain
  torch.load refuses mmengine's HistoryBuffer), a checkpoint with any other object is still refused
  and names the file, and nothing in it runs; a resume without optimizer state is refused;
- checkpoints are saved atomically;
- tools/train_mm.py --resume, and under torchrun on 2 processes with ZeroRedundancyOptimizer(Adan),
  resumed there too;
- mmpretrain's stock tools/train.py with the config's custom_imports as the only link to us, resumed.
"""
import os
import os.path as osp
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from hostile import CodeRunningPickle
from mmengine.config import Config
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner

import adan_plugin
from adan_plugin.data import write_digits_imagefolder
from adan_plugin.integrations.mmengine_safe_globals import mmengine_safe_globals

CONFIG = osp.join(REPO_ROOT, "configs", "mmpretrain", "lenet5_adan_digits.py")
TRAIN_MM = osp.join(REPO_ROOT, "tools", "train_mm.py")
STOCK_TRAIN = osp.join(osp.dirname(__import__("mmpretrain").__file__), ".mim", "tools", "train.py")
SUBPROCESS_TIMEOUT = 240  # a ZeRO checkpoint that deadlocks must fail the test, not hang it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The Runners here train a tiny model: more threads than free cores only slow them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return str(write_digits_imagefolder(tmp_path_factory.mktemp("digits")))


def load_cfg(digits_root, work_dir, name, epochs, **overrides):
    os.environ["ADAN_DIGITS_ROOT"] = digits_root
    cfg = Config.fromfile(CONFIG)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = name  # distinct MessageHub/logger instances per Runner in one process
    cfg.train_cfg.max_epochs = epochs
    cfg.merge_from_dict(overrides)
    return cfg


def run_env(digits_root):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", ADAN_DIGITS_ROOT=digits_root)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return env


def run(cmd, cwd, digits_root):
    proc = subprocess.run(cmd, cwd=cwd, env=run_env(digits_root), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(runner):
    return runner.message_hub.get_scalar("train/loss").data[0]


@pytest.fixture(scope="module")
def one_epoch(digits_root, tmp_path_factory):
    """The config trained for 1 epoch by a Runner in this process."""
    work_dir = tmp_path_factory.mktemp("one_epoch")
    runner = Runner.from_cfg(load_cfg(digits_root, work_dir, "one_epoch", 1))
    runner.train()
    return runner, work_dir


def test_runner_trains_the_digits_config_and_the_loss_falls(one_epoch):
    runner, work_dir = one_epoch
    assert type(runner.optim_wrapper.optimizer) is adan_plugin.Adan
    history = losses(runner)
    assert len(history) == 23  # 1438 images / batch 64
    assert history[-5:].mean() < 0.6 * history[:5].mean(), history
    assert osp.exists(work_dir / "epoch_1.pth")


def test_resume_continues_the_run_that_never_stopped(one_epoch, digits_root, tmp_path):
    _, first_dir = one_epoch
    straight = Runner.from_cfg(load_cfg(digits_root, tmp_path / "straight", "straight", 2))
    straight.train()

    resumed = Runner.from_cfg(load_cfg(digits_root, tmp_path / "resumed", "resumed", 2, resume=True,
                                       load_from=str(first_dir / "epoch_1.pth")))
    with mmengine_safe_globals():
        resumed.train()
    assert resumed.iter == straight.iter == 46
    assert resumed.optim_wrapper.optimizer.param_groups[0]["step"] == 46
    np.testing.assert_allclose(losses(resumed)[-23:], losses(straight)[-23:], rtol=1e-5)
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_works_through_the_registered_loader_where_plain_torch_load_refuses(one_epoch, digits_root,
                                                                                    tmp_path):
    _, first_dir = one_epoch
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer"):
        torch.load(first_dir / "epoch_1.pth")  # torch's default, weights_only=True
    # no mmengine_safe_globals() here: the registration's checkpoint loader allow-lists those types
    runner = Runner.from_cfg(load_cfg(digits_root, tmp_path, "registered_loader", 1, resume=True,
                                      load_from=str(first_dir / "epoch_1.pth")))
    runner.train()
    assert runner.iter == 23 and runner.optim_wrapper.optimizer.param_groups[0]["step"] == 23


class Payload:
    """Stands for any object a checkpoint should not be able to build."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


class AttributeProbe:
    """Reaches past HistoryBuffer's statistics methods through the allow-listed getattr."""

    def __reduce__(self):
        return (getattr, (HistoryBuffer, "register_statistics"))


@pytest.mark.parametrize("intruder, refused", [(Payload(), "posix.system|os.system"),
                                               (AttributeProbe(), "register_statistics"),
                                               (np.array([object()], dtype=object), "ObjectDType|object")])
def test_a_checkpoint_with_anything_else_is_still_refused(one_epoch, tmp_path, intruder, refused):
    _, first_dir = one_epoch
    with mmengine_safe_globals():
        checkpoint = torch.load(first_dir / "epoch_1.pth")
    checkpoint["meta"]["extra"] = intruder
    path = tmp_path / "tampered.pth"
    torch.save(checkpoint, path)
    with mmengine_safe_globals(), pytest.raises(pickle.UnpicklingError, match=refused):
        torch.load(path)


def test_train_mm_resumes_from_the_command_line(one_epoch, digits_root, tmp_path):
    _, first_dir = one_epoch
    out = run([sys.executable, TRAIN_MM, CONFIG, "--work-dir", str(tmp_path),
               "--resume", str(first_dir / "epoch_1.pth"), "--cfg-options", "train_cfg.max_epochs=2"],
              cwd=str(tmp_path), digits_root=digits_root)
    assert "resumed epoch: 1, iter: 23" in out
    assert "optimizer fused backends: (" in out  # logged once, before the optimizer's state is resumed
    assert osp.exists(tmp_path / "epoch_2.pth")


def test_train_mm_under_torchrun_with_zero_adan_on_two_processes_and_resume(digits_root, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                TRAIN_MM, CONFIG, "--launcher", "pytorch", "--work-dir", str(tmp_path)]
    zero = ["optim_wrapper.optimizer.type=ZeroRedundancyOptimizer", "optim_wrapper.optimizer.optimizer_type=Adan"]
    out = run(torchrun + ["--cfg-options", "train_cfg.max_epochs=1"] + zero, cwd=str(tmp_path),
              digits_root=digits_root)
    assert "Epoch(train) [1][10/12]" in out  # 1438 images over 2 processes, 64 each per step
    out = run(torchrun + ["--resume", "--cfg-options", "train_cfg.max_epochs=2"] + zero, cwd=str(tmp_path),
              digits_root=digits_root)
    assert "resumed epoch: 1, iter: 12" in out and "Epoch(train) [2][10/12]" in out
    with mmengine_safe_globals():
        checkpoint = torch.load(tmp_path / "epoch_2.pth")
    n_params = len(checkpoint["state_dict"])
    state = checkpoint["optimizer"]["state"]
    assert len(state) == n_params  # gathered from both ranks' shards
    assert all(set(st) == {"exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"} for st in state.values())
    assert {g["step"] for g in checkpoint["optimizer"]["param_groups"]} == {24}


def test_stock_mmpretrain_train_py_gets_our_adan_through_custom_imports_and_resumes(one_epoch, digits_root,
                                                                                     tmp_path):
    # The stock script, the config's custom_imports as the only link to us: it builds our Adan and
    # resumes on torch >= 2.6 (weights_only=True) from an mmengine checkpoint (HistoryBuffer inside).
    with open(CONFIG) as f:
        code = [line.split("#")[0] for line in f]
    ours = [line.strip() for line in code if "adan_plugin" in line]
    assert ours == ["custom_imports = dict(imports=['adan_plugin'], allow_failed_imports=False)"]
    _, first_dir = one_epoch
    out = run([sys.executable, STOCK_TRAIN, CONFIG, "--work-dir", str(tmp_path), "--resume",
               str(first_dir / "epoch_1.pth"), "--cfg-options", "train_cfg.max_epochs=2"],
              cwd=str(tmp_path), digits_root=digits_root)
    assert out.count("type='Adan' in scope 'mmpretrain' builds adan_plugin.Adan") == 1
    assert "resumed epoch: 1, iter: 23" in out
    with mmengine_safe_globals():
        checkpoint = torch.load(tmp_path / "epoch_2.pth")
    group = checkpoint["optimizer"]["param_groups"][0]
    # keys mmpretrain's own Adan does not have
    assert {"caution", "fused", "state_dtype"} <= set(group)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@pytest.mark.parametrize("script", ["train_mm", "stock"])
def test_resume_from_a_checkpoint_with_code_runs_nothing_and_names_it(one_epoch, digits_root, tmp_path, script):
    _, first_dir = one_epoch
    with mmengine_safe_globals():
        checkpoint = torch.load(first_dir / "epoch_1.pth")
    marker = tmp_path / "code_ran"
    checkpoint["meta"]["extra"] = CodeRunningPickle(marker)
    evil = tmp_path / "evil.pth"
    torch.save(checkpoint, evil)
    cmd = [sys.executable, TRAIN_MM if script == "train_mm" else STOCK_TRAIN, CONFIG, "--work-dir",
           str(tmp_path / "work"), "--resume", str(evil)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=run_env(digits_root), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode != 0 and str(evil) in proc.stderr and "could run code" in proc.stderr
    if script == "train_mm":
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_local_checkpoints_load_as_data_and_name_the_file(tmp_path):
    from mmengine.runner.checkpoint import _load_checkpoint

    from adan_plugin.checkpoint import CheckpointError
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": {"x": CodeRunningPickle(marker)}}, evil)
    with pytest.raises(CheckpointError, match="evil.pth.*could run code"):
        _load_checkpoint(str(evil))
    assert not marker.exists()
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth.*empty \(0 bytes\)"):
        _load_checkpoint(str(empty))


def test_mmengine_checkpoints_are_saved_atomically(tmp_path):
    import resource
    import signal

    from mmengine.runner import runner as mm_runner

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    save = mm_runner.save_checkpoint  # what Runner.save_checkpoint calls
    path = tmp_path / "epoch_1.pth"
    save({"meta": {"epoch": 1}}, str(path))
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save({"meta": {"epoch": 2}, "big": torch.zeros(100_000), "x": Unpicklable()}, str(path))
    assert os.listdir(tmp_path) == ["epoch_1.pth"]
    # The write itself fails half-way (a full disk, here a file-size limit): mmengine's own save has
    # already truncated the previous checkpoint by then; ours leaves it as it was.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        with pytest.raises((OSError, RuntimeError)):  # EFBIG, or torch's zip writer's report of it
            save({"meta": {"epoch": 2}, "big": torch.zeros(100_000)}, str(path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert os.listdir(tmp_path) == ["epoch_1.pth"]
    assert torch.load(path)["meta"]["epoch"] == 1


def _without_optimizer_state(first_dir, tmp_path, edit):
    with mmengine_safe_globals():
        checkpoint = torch.load(first_dir / "epoch_1.pth")
    edit(checkpoint)
    path = tmp_path / "no_optim.pth"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("edit", [lambda c: c.pop("optimizer"),
                                  lambda c: c["optimizer"].update(state={})], ids=["missing", "empty"])
def test_train_mm_refuses_to_resume_without_optimizer_state(one_epoch, digits_root, tmp_path, edit):
    _, first_dir = one_epoch
    path = _without_optimizer_state(first_dir, tmp_path, edit)
    proc = subprocess.run([sys.executable, TRAIN_MM, CONFIG, "--work-dir", str(tmp_path / "work"), "--resume",
                           str(path), "--cfg-options", "train_cfg.max_epochs=2"], cwd=str(tmp_path),
                          env=run_env(digits_root), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(path) in proc.stderr and "--allow-fresh-optimizer-state" in proc.stderr


def test_train_mm_names_a_checkpoint_whose_optimizer_state_does_not_load(one_epoch, digits_root, tmp_path):
    _, first_dir = one_epoch
    path = _without_optimizer_state(first_dir, tmp_path, lambda c: c["optimizer"]["param_groups"][0].update(
        betas=(0.9, 0.99)))  # two betas: another optimizer's
    proc = subprocess.run([sys.executable, TRAIN_MM, CONFIG, "--work-dir", str(tmp_path / "work"), "--resume",
                           str(path), "--cfg-options", "train_cfg.max_epochs=2"], cwd=str(tmp_path),
                          env=run_env(digits_root), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train_mm.py: error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "optimizer state does not load" in errors[0]
    assert "betas must be a tuple of three floats" in errors[0]


def test_resume_hook_allows_fresh_state_when_asked(one_epoch, digits_root, tmp_path):
    _, first_dir = one_epoch
    path = _without_optimizer_state(first_dir, tmp_path, lambda c: c.pop("optimizer"))
    cfg = load_cfg(digits_root, tmp_path / "fresh", "fresh", 1, resume=True, load_from=str(path),
                   custom_hooks=[dict(type="ResumeOptimizerStateHook", allow_fresh=True)])
    runner = Runner.from_cfg(cfg)
    runner.train()  # max_epochs 1 is done: only the resume runs
    assert runner.iter == 23 and not runner.optim_wrapper.optimizer.state
