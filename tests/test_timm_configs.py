"""configs/timm: one YAML per zoo run, equal to the zoo's recipe key by key,
and building the model, optimizer and schedule those values describe."""
import csv
import glob
import importlib.util
import math
import os
import re

import pytest
import torch
import yaml
from timm.layers import DropPath
from timm.scheduler import create_scheduler_v2

from adan_plugin import Adan
from adan_plugin.integrations import timm as adan_timm
from conftest import REPO_ROOT, ZOO_DIR

CONFIG_DIR = os.path.join(REPO_ROOT, "configs", "timm")
TABLE = os.path.join(CONFIG_DIR, "zoo_results.csv")
ZOO_TIMM = os.path.join(ZOO_DIR, "timm")
# Keys that only locate files or label a run on the zoo's machines.
DROPPED = {"data_dir", "output", "resume", "configure", "local_rank", "experiment"}
needs_zoo = pytest.mark.skipif(not os.path.isdir(ZOO_TIMM), reason="../shared/zoo is not present")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train_timm = _load_tool("train_timm")
compare_zoo = _load_tool("compare_zoo")


def _table():
    with open(TABLE, newline="") as f:
        return list(csv.DictReader(f))


RUNS = [row["config"] for row in _table()]


def _ours(name):
    with open(os.path.join(CONFIG_DIR, f"{name}.yaml")) as f:
        return yaml.safe_load(f)


def test_table_lists_all_15_runs_each_with_a_config():
    rows = _table()
    assert len(rows) == 15 and len(set(RUNS)) == 15
    models = sorted({r["model"] for r in rows})
    assert models == ["convnext_tiny_hnf", "deit_base_patch16_224", "deit_small_patch16_224", "resnet101", "resnet50"]
    on_disk = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))}
    assert on_disk == set(RUNS)
    for row in rows:
        assert 0 < float(row["top1_final"]) <= float(row["top1_best"]) < 100
        cfg = _ours(row["config"])
        assert (cfg["model"], cfg["epochs"], cfg["lr"], cfg["weight_decay"], cfg["max_grad_norm"]) == (
            row["model"], int(row["epochs"]), float(row["lr"]), float(row["weight_decay"]),
            float(row["max_grad_norm"]))
        assert cfg["batch_size"] * 8 == int(row["global_batch"]) == 2048


@needs_zoo
@pytest.mark.parametrize("name", RUNS)
def test_config_equals_zoo_yaml_key_by_key(name):
    row = {r["config"]: r for r in _table()}[name]
    with open(os.path.join(ZOO_DIR, row["zoo_entry"] + ".yaml")) as f:
        zoo = yaml.safe_load(f)
    ours = _ours(name)
    assert set(ours) == set(zoo) - DROPPED, "keys differ from the zoo's (machine-specific ones aside)"
    for key in ours:
        assert ours[key] == zoo[key], key


@needs_zoo
def test_table_numbers_match_the_zoo_logs_and_readme():
    with open(os.path.join(ZOO_DIR, "README.md")) as f:
        readme = f.read()
    for row in _table():
        curve = compare_zoo.read_summary(os.path.join(ZOO_DIR, row["zoo_csv"]))
        stats = compare_zoo.final_best(curve)
        assert float(row["top1_final"]) == round(stats["final"], 2)
        assert float(row["top1_best"]) == round(stats["best"], 2)
        # the README's table gives "final / best" or a single number
        entry = row["zoo_entry"][len("timm/"):]
        m = re.search(rf"\| {re.escape(entry)} \|.*\| ([\d.]+)(?: / ([\d.]+))? \|", readme)
        assert m, entry
        assert float(m.group(1)) == float(row["top1_final"])
        if m.group(2):
            assert float(m.group(2)) == float(row["top1_best"])


def _build_on_meta(args):
    # The zoo models are large; on the meta device construction costs no memory.
    with torch.device("meta"):
        return train_timm.create_model(args, num_classes=1000)


@pytest.mark.parametrize("name", RUNS)
def test_config_builds_its_model_optimizer_and_schedule(name):
    cfg = _ours(name)
    args = train_timm.parse_args(["--config", os.path.join(CONFIG_DIR, f"{name}.yaml")])
    for key, value in cfg.items():
        if hasattr(args, key):
            got = getattr(args, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, key

    model = _build_on_meta(args)
    assert type(model).__name__ == {"deit": "VisionTransformer", "resnet": "ResNet",
                                    "convnext": "ConvNeXt"}[re.match(r"[a-z]+", cfg["model"]).group()]
    drop_probs = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    # stochastic depth rises to drop_path at the last block (computed in float32)
    assert math.isclose(max(drop_probs), cfg["drop_path"], rel_tol=1e-6)

    opt = adan_timm.create_optimizer(model, args)
    assert type(opt) is Adan
    d = opt.defaults
    assert d["betas"] == tuple(cfg["opt_betas"]) and d["eps"] == cfg["opt_eps"]
    assert d["max_grad_norm"] == cfg["max_grad_norm"] and d["no_prox"] is bool(cfg.get("no_prox", False))
    no_wd = set(getattr(model, "no_weight_decay", lambda: set())())
    for pname, p in model.named_parameters():
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        assert group["lr"] == cfg["lr"]
        exempt = not cfg["bias_decay"] and (p.ndim <= 1 or pname in no_wd)
        assert group["weight_decay"] == (0.0 if exempt else cfg["weight_decay"]), pname

    sched, num_epochs = create_scheduler_v2(
        opt, sched=cfg["sched"], num_epochs=cfg["epochs"], cooldown_epochs=cfg["cooldown_epochs"],
        min_lr=cfg["min_lr"], warmup_lr=cfg["warmup_lr"], warmup_epochs=cfg["warmup_epochs"])
    assert num_epochs == cfg["epochs"] + cfg["cooldown_epochs"]
    sched.step(0)
    assert math.isclose(opt.param_groups[0]["lr"], cfg["warmup_lr"])
    # timm (warmup_prefix off): the linear warmup ends on the cosine curve, whose clock starts at 0
    w, lr, min_lr = cfg["warmup_epochs"], cfg["lr"], cfg["min_lr"]
    sched.step(w)
    cosine_at_w = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * w / cfg["epochs"]))
    assert math.isclose(opt.param_groups[0]["lr"], cosine_at_w, rel_tol=1e-6)
    sched.step(w // 2)
    assert math.isclose(opt.param_groups[0]["lr"], cfg["warmup_lr"] + (w // 2) * (lr - cfg["warmup_lr"]) / w,
                        rel_tol=1e-6)
    sched.step(num_epochs - 1)
    assert math.isclose(opt.param_groups[0]["lr"], cfg["min_lr"], rel_tol=1e-6)


def test_readme_documents_global_batch_and_fewer_gpus():
    with open(os.path.join(CONFIG_DIR, "README.md")) as f:
        text = f.read()
    assert "2048" in text and "256" in text
    assert "--grad-accum-steps" in text and "linear" in text.lower()
