"""tools/train_timm.py on the embedded digits: a real 2-epoch CPU run, --resume
continuing the same curve, summary.csv and checkpoint formats, clear errors,
DDP under torchrun, and the launcher mode with a stand-in for timm's train.py."""
import argparse
import contextlib
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

import adan_plugin
from conftest import REPO_ROOT, ZOO_DIR
from hostile import CodeRunningPickle

PY = sys.executable
TRAIN = os.path.join(REPO_ROOT, "tools", "train_timm.py")
DEMO = os.path.join(REPO_ROOT, "configs", "timm", "demo", "digits_test_resnet.yaml")
COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
# A schedule that does not depend on the run length, so a 2-epoch run and a
# 3-epoch run share their first two epochs: lr 0.01, 0.005, 0.0025.
FAST = ["--config", DEMO, "--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5",
        "--warmup-epochs", "0", "--plot", "false", "--log-interval", "5", "--batch-size", "128"]

spec = importlib.util.spec_from_file_location("train_timm", TRAIN)
train_timm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_timm)


def run_main(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train_timm.main(argv)
    return result, out.getvalue()


def read_rows(path):
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    return lines[0], [[float(c) for c in row] for row in lines[1:]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_timm")
    # the 2-epoch run through the command line, as a user runs it
    two = subprocess.run([PY, TRAIN, *FAST, "--epochs", "2", "--output", str(root / "run")],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # redo its second epoch from its first checkpoint: must retrace the same curve
    _, redo_log = run_main([*FAST, "--epochs", "2", "--output", str(root / "redo"),
                            "--resume", str(root / "run" / "checkpoint-0.pth.tar")])
    # and continue it past its end, to a third epoch
    _, resumed_log = run_main([*FAST, "--epochs", "3", "--output", str(root / "run"),
                               "--resume", str(root / "run" / "last.pth.tar")])
    return {"root": root, "two_log": two.stdout, "redo_log": redo_log, "resumed_log": resumed_log}


def test_two_epoch_run_writes_summary_in_zoo_format(runs):
    header, rows = read_rows(runs["root"] / "run" / "summary.csv")
    assert header == COLUMNS
    assert [r[0] for r in rows] == [0, 1, 2]
    for epoch, train_loss, eval_loss, top1, top5, lr in rows:
        assert train_loss > 0 and eval_loss > 0 and 0 <= top1 <= top5 <= 100
    assert [r[5] for r in rows] == pytest.approx([0.01, 0.005, 0.0025], rel=1e-9)
    # the digits are easy: far above chance (10%) after 3 epochs
    assert rows[-1][3] > 50
    # top-1 is a count over the 359 validation images
    assert round(rows[-1][3] * 359 / 100, 6) == round(rows[-1][3] * 359 / 100)


def test_resume_continues_the_same_curve(runs):
    _, run = read_rows(runs["root"] / "run" / "summary.csv")
    header, redo = read_rows(runs["root"] / "redo" / "summary.csv")
    # resumed from epoch 0's checkpoint, epoch 1 comes out as in the uninterrupted run
    assert header == COLUMNS and [r[0] for r in redo] == [1]
    assert redo[0] == pytest.approx(run[1], rel=1e-6, abs=1e-9)
    assert "continuing at epoch 1" in runs["redo_log"]
    # resumed from the last checkpoint: epochs 0-1 kept, epoch 2 appended, training went on improving
    assert "continuing at epoch 2" in runs["resumed_log"]
    assert "Epoch 0:" not in runs["resumed_log"] and "Epoch 2:" in runs["resumed_log"]
    assert run[2][1] < run[0][1]


def test_log_shows_throughput_eta_and_final_top1(runs):
    log = runs["two_log"]
    assert "img/s" in log and "ETA epoch" in log and "total" in log
    assert "final top-1:" in log and "embedded digits" in log
    assert "fused backends (" in log


def test_output_folder_args_and_checkpoints(runs):
    out = runs["root"] / "run"
    with open(out / "args.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["opt"] == "adan" and saved["max_grad_norm"] == 5.0 and saved["model"] == "test_resnet"
    assert saved["opt_betas"] == [0.98, 0.92, 0.99] and saved["sched"] == "step"
    for name in ("last.pth.tar", "model_best.pth.tar", "checkpoint-2.pth.tar", "checkpoint-1.pth.tar"):
        ckpt = torch.load(out / name, map_location="cpu", weights_only=True)
        assert {"epoch", "state_dict", "optimizer", "arch", "args"} <= set(ckpt)
    assert not (out / "checkpoint-0.pth.tar").exists()  # checkpoint_hist: 2 in the demo config
    last = torch.load(out / "last.pth.tar", weights_only=True)
    assert last["epoch"] == 2
    assert {"exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"} <= set(next(iter(last["optimizer"]["state"].values())))


def test_resume_names_each_hyperparameter_the_checkpoint_overrides(tmp_path, runs):
    # same command line: nothing to say
    assert "WARNING" not in runs["redo_log"] and "WARNING" not in runs["resumed_log"]
    # epoch 1's checkpoint with --epochs 2: nothing left to train, the resume and args.yaml remain
    out = tmp_path / "o"
    _, log = run_main([*FAST, "--epochs", "2", "--output", str(out), "--resume",
                       str(runs["root"] / "run" / "checkpoint-1.pth.tar"), "--opt", "adanw", "--no-prox",
                       "--weight-decay", "0.05", "--opt-betas", "0.9", "0.9", "0.9", "--max-grad-norm", "1",
                       "--lr", "0.5"])
    warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "win over the command line" in warnings[0], log
    for named in ("weight_decay (--weight-decay): checkpoint 0.02 is used, not the command line's 0.05",
                  "betas (--opt-betas): checkpoint (0.98, 0.92, 0.99) is used, not the command line's (0.9, 0.9, 0.9)",
                  "max_grad_norm (--max-grad-norm): checkpoint 5.0 is used, not the command line's 1.0",
                  "no_prox (--no-prox / --opt adanw): checkpoint False is used, not the command line's True"):
        assert named in warnings[0], warnings[0]
    assert "lr (" not in warnings[0] and "initial_lr" not in warnings[0]  # the schedule sets lr
    # what ran is what is recorded
    with open(out / "args.yaml") as f:
        saved = yaml.safe_load(f)
    assert (saved["weight_decay"], saved["opt_betas"], saved["max_grad_norm"], saved["no_prox"]) == (
        0.02, [0.98, 0.92, 0.99], 5.0, False)


def test_resume_refuses_a_checkpoint_that_could_run_code(tmp_path, runs):
    evil = tmp_path / "evil.pth.tar"
    good = torch.load(runs["root"] / "run" / "last.pth.tar", weights_only=True)
    good["args"] = argparse.Namespace(opt="adan")  # an arbitrary object: needs full unpickling
    torch.save(good, evil)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        run_main([*FAST, "--epochs", "3", "--output", str(out), "--resume", str(evil)])
    assert info.value.code == 2 and "could run code" in str(info.value) and str(evil) in str(info.value)
    assert not out.exists()


# ---------------------------------------------------------------- clear errors
def _error(argv):
    with pytest.raises(SystemExit) as info:
        run_main(argv)
    assert info.value.code == 2  # a user error, as documented (argparse's status too)
    return str(info.value)


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet50\nopt_betas: [0.98, 0.92\n")
    msg = _error(["--config", str(bad)])
    assert "not valid YAML" in msg and "bad.yaml" in msg
    bad.write_text("- a list\n- not a mapping\n")
    assert "must be a mapping" in _error(["--config", str(bad)])
    bad.write_text("model: resnet50\nlearning_rate: 0.1\n")
    msg = _error(["--config", str(bad)])
    assert "unknown keys" in msg and "learning_rate" in msg
    bad.write_text("model: resnet50\njsd_loss: true\n")
    assert "jsd_loss" in _error(["--config", str(bad)])
    assert "does not exist" in _error(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("options, says", [
    (["--opt", "adamn"], "--opt adamn: Optimizer adamn not found"),
    (["--opt-kwargs", "bias_decay=True"], "unexpected keyword argument 'bias_decay'"),
    (["--opt-betas", "0.98", "0.92"], "betas must be a tuple of three floats"),
    (["--max-grad-norm", "-1"], "invalid max_grad_norm=-1.0"),
    (["--opt-kwargs", "state_dtype=8-bit"], "state_dtype='8-bit' is neither '8bit'"),
])
def test_an_optimizer_the_options_cannot_build_is_a_user_error(tmp_path, options, says):
    msg = _error([*FAST, *options, "--output", str(tmp_path / "o")])
    assert msg.startswith("train_timm.py: error: ") and says in msg and "\n" not in msg
    assert not (tmp_path / "o").exists()


def test_an_optimizer_error_from_a_recipe_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    with open(DEMO) as f:
        recipe = yaml.safe_load(f)
    bad.write_text(yaml.safe_dump({**recipe, "opt_kwargs": {"state_dtype": "8-bit"}}))
    proc = subprocess.run([PY, TRAIN, "--config", str(bad), "--output", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["train_timm.py: error: --opt adan: state_dtype='8-bit' is neither '8bit' (8-bit block-wise "
                      "states) nor a torch dtype name (e.g. 'bfloat16', 'float32')"]


def test_bf16_parameters_with_kahan_buffers_train_save_and_resume(tmp_path):
    # --model-dtype bfloat16: pure-bf16 training (parameters, activations and gradients in bf16, no
    # autocast), the loss in float32; kahan_sum's buffers are made, saved and restored on resume.
    out = tmp_path / "bf16"
    argv = [*FAST, "--model-dtype", "bfloat16", "--opt-kwargs", "kahan_sum=True", "--output", str(out)]
    result, log = run_main([*argv, "--epochs", "1"])
    assert "M bfloat16 params" in log, log[-2000:]
    ckpt = torch.load(out / "last.pth.tar", map_location="cpu", weights_only=True)
    floats = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert floats and {v.dtype for v in floats} == {torch.bfloat16}
    comps = [s["kahan_comp"] for s in ckpt["optimizer"]["state"].values()]
    assert len(comps) == len(ckpt["optimizer"]["state"]) > 0
    assert {c.dtype for c in comps} == {torch.bfloat16} and any(bool(c.ne(0).any()) for c in comps)
    resumed, resumed_log = run_main([*argv, "--epochs", "2", "--resume", str(out / "last.pth.tar")])
    assert "restart from zero" not in resumed_log and "Epoch 1:" in resumed_log
    assert resumed["final_top1"] > 25.0, resumed_log[-2000:]  # it learns (10% is chance; fp32: ~60% here)
    assert "--model-dtype bfloat16 trains the parameters themselves" in _error([*argv, "--amp"])
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text("model: test_resnet\nlr: 0.01\nmodel_dtype: bf16\n")  # argparse checks choices on the CLI only
    assert "model_dtype: expected one of 'float32', 'bfloat16', 'float16', got 'bf16'" in _error(
        ["--config", str(recipe)])


@pytest.mark.skipif(not adan_plugin.fused_extension_available(), reason="8-bit states need the kernels")
def test_resume_names_a_state_format_the_command_line_changes(tmp_path):
    # state_dtype and kahan_sum are the run's own choices, not the checkpoint's: resuming an 8-bit run
    # without --opt-kwargs state_dtype=8bit converts its states to fp32 (4x the memory); the log says so.
    out = tmp_path / "q8"
    run_main([*FAST, "--epochs", "1", "--opt-kwargs", "state_dtype=8bit", "--output", str(out)])
    _, log = run_main([*FAST, "--epochs", "2", "--output", str(out), "--resume", str(out / "last.pth.tar")])
    assert ("WARNING: checkpoint " + str(out / "last.pth.tar") + ": state_dtype='8bit' in the checkpoint, None in "
            "this run (the states are converted on loading, 8-bit to float or back") in log
    _, kept = run_main([*FAST, "--epochs", "3", "--opt-kwargs", "state_dtype=8bit", "--output", str(out),
                        "--resume", str(out / "checkpoint-0.pth.tar")])
    assert "state_dtype=" not in kept and "Epoch 2:" in kept


def test_compare_adamw_gives_adamw_its_own_betas(tmp_path, monkeypatch):
    from adan_plugin.integrations import timm as timm_integration
    runs = []

    def record(args):  # the run itself is the same train() for both; what differs is its options
        args.rank, args.distributed = 0, False
        runs.append(args)
        return {"output_dir": str(tmp_path), "final_top1": 0.0}

    monkeypatch.setattr(train_timm, "train", record)

    def optimizers(*extra):
        runs.clear()
        run_main([*FAST, "--compare-adamw", "--output", str(tmp_path), *extra])
        return [timm_integration.create_optimizer(torch.nn.Linear(3, 2), args) for args in runs]

    adan, adamw = optimizers()
    assert adan.defaults["betas"] == (0.98, 0.92, 0.99)  # the recipe's, for Adan
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.9, 0.999)
    assert adamw.defaults["lr"] == pytest.approx(0.01 / 5)
    assert max(g["weight_decay"] for g in adamw.param_groups) == 0.05
    _, adamw = optimizers("--adamw-betas", "0.9", "0.95")
    assert adamw.defaults["betas"] == (0.9, 0.95)


def test_unknown_model(tmp_path):
    msg = _error([*FAST, "--model", "resnet5O", "--output", str(tmp_path / "o")])
    assert "unknown model 'resnet5O'" in msg and "resnet50" in msg
    assert not (tmp_path / "o").exists()


def test_missing_data_dir(tmp_path):
    msg = _error([*FAST, "--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")])
    assert "data dir" in msg and "nowhere" in msg
    assert not (tmp_path / "o").exists()


def test_cli_overrides_the_recipe_including_adan_keys():
    cfg = os.path.join(REPO_ROOT, "configs", "timm", "res50_100.yaml")
    args = train_timm.parse_args(["--config", cfg])
    assert (args.max_grad_norm, args.no_prox, args.bias_decay, args.lr) == (5.0, False, True, 0.03)
    args = train_timm.parse_args(["--config", cfg, "--opt-betas", "0.9", "0.9", "0.95", "--opt-eps", "1e-6",
                                  "--max-grad-norm", "0", "--no-prox", "--bias-decay", "false", "--lr", "0.01"])
    assert args.opt_betas == [0.9, 0.9, 0.95] and args.opt_eps == 1e-6
    assert (args.max_grad_norm, args.no_prox, args.bias_decay, args.lr) == (0.0, True, False, 0.01)
    assert args.model == "resnet50" and args.mixup == 0.1  # the rest stays the recipe's


@pytest.mark.skipif(not os.path.isdir(os.path.join(ZOO_DIR, "timm")), reason="../shared/zoo is not present")
def test_zoo_yamls_load_unchanged():
    import glob
    for path in glob.glob(os.path.join(ZOO_DIR, "timm", "*", "*", "args_*.yaml")):
        with open(path) as f:
            zoo = yaml.safe_load(f)
        args = train_timm.parse_args(["--config", path])
        assert (args.model, args.lr, args.opt) == (zoo["model"], zoo["lr"], "adan")
        assert args.opt_betas == zoo["opt_betas"] and args.max_grad_norm == zoo["max_grad_norm"]


# ---------------------------------------------------------------- DDP
def test_ddp_under_torchrun(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", TRAIN,
                           *FAST, "--epochs", "1", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, rows = read_rows(out / "summary.csv")
    assert header == COLUMNS and len(rows) == 1  # written once, by rank 0
    assert "global batch 256" in proc.stdout  # 128 per process x 2 processes
    assert proc.stdout.count("final top-1:") == 1


# ---------------------------------------------------------------- launcher
STAND_IN = textwrap.dedent('''
    """Stand-in for timm's train.py: its config handling and optimizer factory call."""
    import argparse, json
    import yaml
    from timm.models import create_model
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.utils import ParseKwargs

    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--opt", default="sgd")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=2e-5)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--opt-eps", type=float, default=None)
    parser.add_argument("--opt-betas", type=float, nargs="+", default=None)
    parser.add_argument("--layer-decay", type=float, default=None)
    parser.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)
    parser.add_argument("--report", required=True)

    cfg_args, remaining = config_parser.parse_known_args()
    if cfg_args.config:
        with open(cfg_args.config) as f:
            parser.set_defaults(**yaml.safe_load(f))
    args = parser.parse_args(remaining)
    model = create_model(args.model, num_classes=10)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    one_d = {id(p) for p in model.parameters() if p.ndim <= 1}
    with open(args.report, "w") as f:
        json.dump({"class": type(optimizer).__module__ + "." + type(optimizer).__name__,
                   "state_dtype": str(optimizer.defaults.get("state_dtype")),
                   "defaults": {k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float, bool, list, tuple, type(None)))},
                   "wd_1d": sorted({g["weight_decay"] for g in optimizer.param_groups for p in g["params"] if id(p) in one_d}),
                   "wd_nd": sorted({g["weight_decay"] for g in optimizer.param_groups for p in g["params"] if id(p) not in one_d})}, f)
''')


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch") / "train.py"
    path.write_text(STAND_IN)
    return path


def _launch(stand_in, tmp_path, *extra, cfg=os.path.join(REPO_ROOT, "configs", "timm", "res50_100.yaml")):
    report = tmp_path / "report.json"
    proc = subprocess.run([PY, TRAIN, "--launch", str(stand_in), "--config", cfg, "--model", "test_resnet",
                           "--report", str(report), *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(report) as f:
        return json.load(f)


def test_launcher_passes_the_recipe_adan_keys(stand_in, tmp_path):
    rep = _launch(stand_in, tmp_path)
    assert rep["class"] == "adan_plugin.adan.Adan"
    d = rep["defaults"]
    assert d["max_grad_norm"] == 5.0 and d["no_prox"] is False and d["lr"] == 0.03
    assert d["betas"] == [0.98, 0.92, 0.99]
    assert rep["wd_1d"] == [0.02] and rep["wd_nd"] == [0.02]  # bias_decay: true in res50_100


def test_launcher_command_line_overrides_and_user_opt_kwargs(stand_in, tmp_path):
    rep = _launch(stand_in, tmp_path, "--max-grad-norm", "1.5", "--no-prox", "--bias-decay", "false",
                  "--opt-kwargs", "foreach=True")
    d = rep["defaults"]
    assert (d["max_grad_norm"], d["no_prox"], d["foreach"]) == (1.5, True, True)
    assert rep["wd_1d"] == [0.0] and rep["wd_nd"] == [0.02]  # timm's default grouping again


def _recipe_with(tmp_path, **keys):
    with open(os.path.join(REPO_ROOT, "configs", "timm", "res50_100.yaml")) as f:
        recipe = yaml.safe_load(f)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, **keys}))
    return str(path)


def test_launcher_keeps_the_recipe_opt_kwargs_and_every_command_line_one(stand_in, tmp_path):
    cfg = _recipe_with(tmp_path, opt_kwargs={"caution": True, "foreach": False})
    # the recipe's alone: the launcher's own --opt-kwargs (the Adan keys) must not replace them
    d = _launch(stand_in, tmp_path, cfg=cfg)["defaults"]
    assert (d["caution"], d["foreach"], d["max_grad_norm"]) == (True, False, 5.0)
    # with two --opt-kwargs on the command line: all merged, the command line's last
    rep = _launch(stand_in, tmp_path, "--opt-kwargs", "foreach=True", "--opt-kwargs=max_grad_norm=2.0", cfg=cfg)
    d = rep["defaults"]
    assert (d["caution"], d["foreach"], d["max_grad_norm"]) == (True, True, 2.0)


@pytest.mark.skipif(not adan_plugin.fused_extension_available(), reason="low-memory states need the kernels")
def test_launcher_state_dtype_from_the_recipe_and_by_name(stand_in, tmp_path):
    cfg = _recipe_with(tmp_path, opt_kwargs={"state_dtype": "8bit"})
    assert _launch(stand_in, tmp_path, cfg=cfg)["state_dtype"] == "8bit"
    assert _launch(stand_in, tmp_path, "--opt-kwargs", "foreach=False", cfg=cfg)["state_dtype"] == "8bit"
    # a dtype by name, as mm configs write it
    rep = _launch(stand_in, tmp_path, "--opt-kwargs", "state_dtype=bfloat16")
    assert rep["state_dtype"] == "torch.bfloat16"


def test_launcher_leaves_other_optimizers_alone(stand_in, tmp_path):
    rep = _launch(stand_in, tmp_path, "--opt", "adamw", "--lr", "0.001")
    assert rep["class"] == "torch.optim.adamw.AdamW"


def test_launcher_missing_script(tmp_path):
    proc = subprocess.run([PY, TRAIN, "--launch", str(tmp_path / "train.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no training script" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launcher_without_a_config_in_a_fresh_process(stand_in, tmp_path):
    # Nothing imports timm before the launcher does (the registration into timm is lazy).
    report = tmp_path / "report.json"
    proc = subprocess.run([PY, TRAIN, "--launch", str(stand_in), "--model", "test_resnet", "--opt", "adan",
                           "--lr", "0.01", "--max-grad-norm", "2", "--report", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(report) as f:
        rep = json.load(f)
    assert rep["class"] == "adan_plugin.adan.Adan" and rep["defaults"]["max_grad_norm"] == 2.0


def test_integrations_timm_is_reachable_before_timm_is_imported():
    for code in ("import adan_plugin, sys; assert 'timm' not in sys.modules; "
                 "print(adan_plugin.integrations.timm.launch_upstream_train.__name__)",
                 "from adan_plugin.integrations import timm; print(timm.launch_upstream_train.__name__)"):
        proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=REPO_ROOT))
        assert proc.returncode == 0 and proc.stdout.strip() == "launch_upstream_train", proc.stderr[-2000:]


# ---------------------------------------------------------------- zoo recipe on digits
def test_zoo_recipe_runs_with_its_augmentation_stack(tmp_path):
    """vit-B_300 unchanged but for a tiny model and one short epoch: RandAugment m9, mixup/cutmix,
    random erasing, soft-target loss, bias_decay, AMP (bfloat16 on CPU), channels_last, EMA, accumulation."""
    cfg = os.path.join(REPO_ROOT, "configs", "timm", "vit-B_300.yaml")
    out = tmp_path / "vit"
    result, log = run_main(["--config", cfg, "--model", "test_vit", "--img-size", "32", "--batch-size", "32",
                            "--grad-accum-steps", "2", "--epochs", "1", "--cooldown-epochs", "0",
                            "--warmup-epochs", "0", "--channels-last", "--model-ema", "--workers", "0",
                            "--plot", "false", "--output", str(out)])
    assert "aug_repeats=3 needs a distributed run" in log
    assert "global batch 64" in log  # 32 x 1 process x 2 accumulation steps
    header, rows = read_rows(out / "summary.csv")
    assert len(rows) == 1 and all(v == v for v in rows[0])  # finite numbers, no NaN
    ckpt = torch.load(out / "last.pth.tar", weights_only=True)
    assert "state_dict_ema" in ckpt
    with open(out / "args.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["aa"] == "rand-m9-mstd0.5-inc1" and saved["mixup"] == 0.8 and saved["amp"] is True


def test_losses_follow_the_recipe():
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    ns = lambda **kw: argparse.Namespace(**{"bce_loss": False, "smoothing": 0.0, "bce_target_thresh": None, **kw})  # noqa: E731
    assert isinstance(train_timm.make_loss(ns(bce_loss=True), mixup_active=True), BinaryCrossEntropy)
    assert isinstance(train_timm.make_loss(ns(smoothing=0.1), mixup_active=True), SoftTargetCrossEntropy)
    assert isinstance(train_timm.make_loss(ns(smoothing=0.1), mixup_active=False), LabelSmoothingCrossEntropy)
    assert isinstance(train_timm.make_loss(ns(), mixup_active=False), torch.nn.CrossEntropyLoss)


def test_randaugment_posterize_to_zero_bits():
    from PIL import Image
    from timm.data import auto_augment

    from adan_plugin.integrations.timm import _posterize_any_bits, fix_randaugment_posterize
    fix_randaugment_posterize()
    img = Image.new("RGB", (4, 4), (200, 77, 13))
    assert {c for _, c in _posterize_any_bits(img, 0).getcolors()} == {(0, 0, 0)}
    assert {c for _, c in _posterize_any_bits(img, 4).getcolors()} == {(192, 64, 0)}
    assert _posterize_any_bits(img, 8) is img
    # the zoo's policy at its maximum magnitude keeps 0 bits: must not raise
    op = auto_augment.RandAugment(auto_augment.rand_augment_ops(10, transforms=["PosterizeIncreasing"]), 1)
    op.ops[0].prob = 1.0
    assert {c for _, c in op(img).getcolors()} == {(0, 0, 0)}


def test_resume_with_another_model_is_a_clear_error(tmp_path, runs):
    msg = _error([*FAST, "--model", "test_vit", "--epochs", "3", "--output", str(tmp_path / "o"),
                  "--resume", str(runs["root"] / "run" / "last.pth.tar")])
    assert "test_resnet" in msg and "test_vit" in msg


# ---------------------------------------------------------------- checkpoints: safety and clear errors
@pytest.mark.parametrize("option", ["--resume", "--initial-checkpoint"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_no_checkpoint_option_runs_code_from_the_file(tmp_path, runs, option, legacy):
    marker = tmp_path / "code_ran"
    ckpt = torch.load(runs["root"] / "run" / "last.pth.tar", weights_only=True)
    ckpt["best"] = CodeRunningPickle(marker)
    evil = tmp_path / "evil.pth.tar"
    torch.save(ckpt, evil, _use_new_zipfile_serialization=not legacy)
    msg = _error([*FAST, "--epochs", "3", "--output", str(tmp_path / "o"), option, str(evil)])
    assert str(evil) in msg and "could run code" in msg
    assert not marker.exists() and not (tmp_path / "o").exists()


def _tampered(runs, tmp_path, edit):
    ckpt = torch.load(runs["root"] / "run" / "checkpoint-1.pth.tar", weights_only=True)
    edit(ckpt)
    path = tmp_path / "tampered.pth.tar"
    torch.save(ckpt, path)
    return path


def _resume_error(runs, tmp_path, edit, *extra):
    path = _tampered(runs, tmp_path, edit)
    msg = _error([*FAST, "--epochs", "3", "--output", str(tmp_path / "o"), "--resume", str(path), *extra])
    assert str(path) in msg
    assert not (tmp_path / "o").exists()
    return msg


def _empty_state(ckpt):
    ckpt["optimizer"]["state"] = {}


def test_resume_without_optimizer_state_is_refused(tmp_path, runs):
    assert "no optimizer state" in _resume_error(runs, tmp_path, lambda c: c.pop("optimizer"))
    msg = _resume_error(runs, tmp_path, _empty_state)
    assert "empty although it counts" in msg and "--allow-fresh-optimizer-state" in msg


def test_resume_without_optimizer_state_when_asked(tmp_path, runs):
    path = _tampered(runs, tmp_path, _empty_state)
    _, log = run_main([*FAST, "--epochs", "3", "--output", str(tmp_path / "o"), "--resume", str(path),
                       "--allow-fresh-optimizer-state"])
    assert "WARNING" in log and "moments restart from zero" in log and "continuing at epoch 2" in log


@pytest.mark.parametrize("edit, reason", [
    (lambda c: c.pop("epoch"), "no 'epoch'"),
    (lambda c: c.update(epoch="two"), "'epoch' must be a non-negative integer"),
    (lambda c: c.update(epoch=-1), "'epoch' must be a non-negative integer"),
    (lambda c: c.update(epoch=1.5), "'epoch' must be a non-negative integer"),
    (lambda c: c.update(state_dict=[1, 2]), "'state_dict' is a list"),
    (lambda c: c.update(optimizer={"state": {0: {}}}), "no 'param_groups'"),
])
def test_resume_from_a_malformed_checkpoint_is_a_clear_error(tmp_path, runs, edit, reason):
    assert reason in _resume_error(runs, tmp_path, edit)


def test_empty_and_truncated_checkpoints_give_a_reason(tmp_path):
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    assert "empty (0 bytes)" in _error([*FAST, "--resume", str(empty), "--output", str(tmp_path / "o")])
    cut = tmp_path / "cut.pth.tar"
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0}, buf)
    cut.write_bytes(buf.getvalue()[:3000])
    assert "truncated" in _error([*FAST, "--resume", str(cut), "--output", str(tmp_path / "o")])


def test_a_failed_save_leaves_no_partial_or_temporary_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    path = tmp_path / "last.pth.tar"
    train_timm.save_checkpoint(str(path), {"epoch": 0})
    with pytest.raises(RuntimeError, match="cannot pickle"):
        train_timm.save_checkpoint(str(path), {"epoch": 1, "w": torch.zeros(100_000), "x": Unpicklable()})
    assert os.listdir(tmp_path) == ["last.pth.tar"]
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    with pytest.raises(KeyError):
        train_timm.write_summary(str(tmp_path / "summary.csv"), [{"epoch": 0}])
    assert os.listdir(tmp_path) == ["last.pth.tar"]


def test_user_errors_exit_with_status_2_and_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: test_resnet\nepochs: 1.5\n")
    proc = subprocess.run([PY, TRAIN, "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"train_timm.py: error: config '{bad}': epochs: expected an integer, got 1.5"]


# ---------------------------------------------------------------- upstream timm train.py
def _upstream_train_py():
    """timm's own train.py: it is not in timm's wheel nor its sdist, so it comes from outside the
    repository: $ADAN_TIMM_TRAIN_PY, or ../shared/timm/train.py beside the checkout."""
    for path in (os.environ.get("ADAN_TIMM_TRAIN_PY"), os.path.join(os.path.dirname(ZOO_DIR), "timm", "train.py")):
        if path and os.path.isfile(path):
            return path
    return None


@pytest.mark.skipif(_upstream_train_py() is None,
                    reason="timm's train.py is not available ($ADAN_TIMM_TRAIN_PY or ../shared/timm/train.py)")
def test_launch_upstream_timm_train_py_for_one_epoch_on_the_digits(tmp_path):
    from adan_plugin.data import write_digits_imagefolder
    data = write_digits_imagefolder()
    proc = subprocess.run([PY, TRAIN, "--launch", _upstream_train_py(), "--data-dir", str(data),
                           "--train-split", "train", "--val-split", "val", "--model", "test_resnet",
                           "--img-size", "32", "--num-classes", "10", "--opt", "adan", "--lr", "0.01",
                           "--max-grad-norm", "5", "--no-prox", "--epochs", "1", "--warmup-epochs", "0",
                           "--batch-size", "64", "--workers", "0", "--device", "cpu", "--output", str(tmp_path),
                           "--experiment", "up"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "up" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["eval_top1"]) > 20  # chance is 10%
    with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py saves its args
        ckpt = torch.load(tmp_path / "up" / "last.pth.tar", weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    # our Adan (keys timm's Adan has not), with the Adan flags passed through --opt-kwargs
    assert {"caution", "fused", "state_dtype"} <= set(group)
    assert group["max_grad_norm"] == 5.0 and group["no_prox"] is True
