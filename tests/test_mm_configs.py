"""configs/mmpretrain: every ImageNet config carries its zoo run's values and builds its optimizer.

The zoo YAMLs (../shared/zoo/timm) are the reference; timm's own CosineLRScheduler and
param_groups_weight_decay are the references for the schedule and for `bias_decay`.
"""
import functools
import glob
import math
import os.path as osp

import pytest
import torch
import yaml
from conftest import REPO_ROOT, ZOO_DIR
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS, DefaultScope

import adan_plugin  # noqa: F401  (registers Adan, TimmCosineLR; mmpretrain:: base configs)
from adan_plugin import Adan

CONFIG_DIR = osp.join(REPO_ROOT, "configs", "mmpretrain")
ZOO_RUN = {  # config -> zoo YAML
    "vit-base-p16_adan_8xb256-150e_in1k.py": "ViT/base/args_vit-B_150.yaml",
    "vit-base-p16_adan_8xb256-300e_in1k.py": "ViT/base/args_vit-B_300.yaml",
    "vit-base-p16_adan_8xb256-300e-T_in1k.py": "ViT/base/args_vit-B_300_T.yaml",
    "resnet50_adan_8xb256-100e_in1k.py": "ResNet/Res50/args_res50_100.yaml",
    "resnet50_adan_8xb256-200e_in1k.py": "ResNet/Res50/args_res50_200.yaml",
    "resnet50_adan_8xb256-300e_in1k.py": "ResNet/Res50/args_res50_300.yaml",
    "convnext-tiny_adan_8xb256-150e_in1k.py": "ConvNext/small/args_cvnext_150.yaml",
    "convnext-tiny_adan_8xb256-300e_in1k.py": "ConvNext/small/args_cvnext_300.yaml",
}
PROCESSES = 8  # every zoo run: 8 processes x batch_size 256 = 2048
TIMM_MODEL = {"vit": "deit_base_patch16_224", "resnet50": "resnet50", "convnext": "convnext_tiny_hnf"}  # YAML `model`


def test_every_imagenet_config_is_mapped_to_a_zoo_run():
    assert sorted(osp.basename(p) for p in glob.glob(osp.join(CONFIG_DIR, "*_in1k.py"))) == sorted(ZOO_RUN)


@functools.lru_cache(maxsize=None)
def load(name):
    """The parsed config (cached: parsing the mmpretrain:: bases takes a while; tests only read it)."""
    return Config.fromfile(osp.join(CONFIG_DIR, name))


def pipeline_step(pipeline, kind):
    steps = [s for s in pipeline if s["type"] == kind]
    return steps[0] if steps else None


def recipe_of(cfg):
    """The training-relevant values of an mm config, named as the zoo YAML names them."""
    opt = cfg.optim_wrapper.optimizer
    sched, = cfg.param_scheduler
    augments = {a["type"]: a["alpha"] for a in cfg.model.train_cfg.augments}
    loss = cfg.model.head.loss
    train = cfg.train_dataloader
    rand_aug = pipeline_step(train.dataset.pipeline, "RandAugment")
    erasing = pipeline_step(train.dataset.pipeline, "RandomErasing")
    resize = pipeline_step(cfg.val_dataloader.dataset.pipeline, "ResizeEdge")
    ema = [h for h in cfg.get("custom_hooks", []) if h["type"] == "EMAHook"]
    return {
        "opt": opt.type.lower(), "lr": opt.lr, "weight_decay": opt.weight_decay,
        "opt_betas": list(opt.betas), "opt_eps": opt.eps, "max_grad_norm": opt.max_grad_norm,
        "no_prox": opt.no_prox, "bias_decay": not cfg.optim_wrapper.get("paramwise_cfg"),
        "amp": cfg.optim_wrapper.type == "AmpOptimWrapper", "clip_grad": cfg.optim_wrapper.get("clip_grad"),
        "sched": "cosine" if sched["type"] == "TimmCosineLR" else sched["type"],
        "epochs": sched["t_initial"], "cooldown_epochs": cfg.train_cfg.max_epochs - sched["t_initial"],
        "warmup_epochs": sched["warmup_t"], "warmup_lr": sched["warmup_lr_init"], "min_lr": sched["lr_min"],
        "batch_size": train.batch_size,
        "aug_repeats": train.sampler.get("num_repeats", 0) if train.sampler.type == "RepeatAugSampler" else 0,
        "drop_path": cfg.model.backbone.get("drop_path_rate", 0.0), "drop": cfg.model.backbone.get("drop_rate", 0.0),
        "mixup": augments.get("Mixup", 0.0), "cutmix": augments.get("CutMix", 0.0),
        "bce_loss": bool(loss.get("use_sigmoid", False)),
        "smoothing": loss.get("label_smooth_val", 0.0),
        "aa": f"rand-m{rand_aug['magnitude_level']}-mstd{rand_aug['magnitude_std']}-inc1"
        if rand_aug["policies"] == "timm_increasing" and rand_aug["num_policies"] == 2 else rand_aug,
        "reprob": erasing["erase_prob"] if erasing else 0.0,
        "remode": {"rand": "pixel"}[erasing["mode"]] if erasing else "pixel",
        "crop_pct": round(224 / resize["scale"], 2),
        "model_ema": bool(ema), "model_ema_decay": 1 - ema[0]["momentum"] if ema else None,
        "seed": cfg.randomness.seed,
    }


def zoo_recipe(path):
    with open(path) as f:
        args = yaml.safe_load(f)
    recipe = {k: args.get(k) for k in (
        "opt", "lr", "weight_decay", "opt_betas", "opt_eps", "max_grad_norm", "bias_decay", "amp", "clip_grad",
        "sched", "epochs", "cooldown_epochs", "warmup_epochs", "warmup_lr", "min_lr", "batch_size",
        "aug_repeats", "drop_path", "drop", "mixup", "cutmix", "bce_loss", "smoothing", "aa", "reprob", "remode",
        "model_ema", "seed")}
    recipe["no_prox"] = bool(args.get("no_prox", False))
    recipe["crop_pct"] = args["crop_pct"] if args.get("crop_pct") is not None else 0.88  # timm default 0.875
    recipe["model_ema_decay"] = args["model_ema_decay"] if args["model_ema"] else None
    # the zoo's settings that these configs fix rather than read
    assert args["mixup_prob"] == 1.0 and args["mixup_switch_prob"] == 0.5 and args["mixup_mode"] == "batch"
    assert args["scale"] == [0.08, 1.0] and args["hflip"] == 0.5 and args["vflip"] == 0.0
    assert args["lr_cycle_limit"] == 1 and args["lr_noise"] is None and args["lr_k_decay"] == 1.0
    return recipe


@pytest.mark.skipif(not osp.isdir(ZOO_DIR), reason="the zoo reference data (../shared/zoo) is not present")
@pytest.mark.parametrize("name", sorted(ZOO_RUN))
def test_config_carries_the_zoo_runs_recipe_key_by_key(name):
    ours, zoo = recipe_of(load(name)), zoo_recipe(osp.join(ZOO_DIR, "timm", ZOO_RUN[name]))
    assert set(ours) == set(zoo)
    assert ours == zoo, {k: (ours[k], zoo[k]) for k in zoo if ours[k] != zoo[k]}
    assert ours["batch_size"] * PROCESSES == load(name).auto_scale_lr.base_batch_size == 2048


@pytest.mark.parametrize("name", sorted(ZOO_RUN))
def test_lr_schedule_is_timms_cosine_epoch_by_epoch(name):
    from timm.scheduler import CosineLRScheduler

    cfg = load(name)
    sched_cfg, = cfg.param_scheduler
    lrs = {}
    for who in ("ours", "timm"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim_wrapper.optimizer.lr)
        if who == "ours":
            sched = PARAM_SCHEDULERS.build(dict(sched_cfg, optimizer=opt))
        else:
            sched = CosineLRScheduler(opt, t_initial=sched_cfg["t_initial"], lr_min=sched_cfg["lr_min"],
                                      warmup_t=sched_cfg["warmup_t"], warmup_lr_init=sched_cfg["warmup_lr_init"])
        lrs[who] = []
        for epoch in range(cfg.train_cfg.max_epochs):
            lrs[who].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step() if who == "ours" else sched.step(epoch + 1)
    assert lrs["ours"] == pytest.approx(lrs["timm"], rel=1e-12, abs=1e-15)


@pytest.mark.filterwarnings("ignore:Detected call of `scheduler.step\\(\\)` before")  # no optimizer steps here
def test_timm_cosine_lr_resumes_and_converts_to_iterations():
    def schedule(**kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        cfg = dict(type="TimmCosineLR", optimizer=opt, t_initial=10, warmup_t=3, warmup_lr_init=1e-3, lr_min=1e-4,
                   begin=0, end=12, **kw)
        sched = PARAM_SCHEDULERS.build(cfg) if "epoch_length" not in kw else \
            PARAM_SCHEDULERS.get("TimmCosineLR").build_iter_from_epoch(**{k: v for k, v in cfg.items() if k != "type"})
        return opt, sched

    opt, sched = schedule()
    for _ in range(5):
        sched.step()
    state = sched.state_dict()
    opt2, resumed = schedule()
    resumed.load_state_dict(state)
    sched.step()
    resumed.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(
        1e-4 + 0.5 * (0.1 - 1e-4) * (1 + math.cos(math.pi * 6 / 10)))
    opt, per_iter = schedule(epoch_length=4)  # every 4th iteration is an epoch boundary
    lrs = []
    for _ in range(48):
        lrs.append(opt.param_groups[0]["lr"])
        per_iter.step()
    opt_e, per_epoch = schedule()
    for epoch in range(12):
        assert lrs[4 * epoch] == pytest.approx(opt_e.param_groups[0]["lr"]), epoch
        per_epoch.step()
    assert lrs[1] > lrs[0] and lrs[5] > lrs[4]  # warmup moves within an epoch too


_MODELS = {}


def build_model(cfg):
    from mmpretrain.registry import MODELS

    key = repr(cfg.model)
    if key not in _MODELS:
        with DefaultScope.overwrite_default_scope("mmpretrain"):
            _MODELS[key] = MODELS.build(cfg.model)
    return _MODELS[key]


@pytest.mark.parametrize("family, name", [(f, next(n for n in sorted(ZOO_RUN) if n.startswith(f)))
                                          for f in TIMM_MODEL])
def test_model_is_the_zoo_runs_timm_model(family, name):
    import timm

    with torch.device("meta"):
        reference = timm.create_model(TIMM_MODEL[family], pretrained=False)
    model = build_model(load(name))
    # parameter by parameter (sizes: timm's ConvNeXt holds its MLP as 1x1 convs, mmpretrain's as linears)
    assert sorted(p.numel() for p in model.parameters()) == sorted(p.numel() for p in reference.parameters())
    if osp.isdir(ZOO_DIR):
        with open(osp.join(ZOO_DIR, "timm", ZOO_RUN[name])) as f:
            assert yaml.safe_load(f)["model"] == TIMM_MODEL[family]


@pytest.mark.parametrize("name", sorted(ZOO_RUN) + ["lenet5_adan_digits.py"])
def test_optim_wrapper_builds_from_every_config(name, monkeypatch):
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp
    from timm.optim import param_groups_weight_decay

    monkeypatch.setattr(amp, "is_cuda_available", lambda: True)  # AmpOptimWrapper (amp: true) on CPU
    cfg = load(name)
    model = build_model(cfg)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    opt = wrapper.optimizer
    assert type(opt) is Adan
    for key in ("lr", "weight_decay", "eps", "max_grad_norm", "no_prox"):
        assert opt.defaults[key] == cfg.optim_wrapper.optimizer[key], key
    assert opt.defaults["betas"] == tuple(cfg.optim_wrapper.optimizer.betas)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay) == sum(1 for p in model.parameters() if p.requires_grad)
    wd = cfg.optim_wrapper.optimizer.weight_decay
    if name.startswith("convnext"):  # bias_decay: false -> timm's own grouping is the reference
        no_decay, = [g for g in param_groups_weight_decay(model, wd) if g["weight_decay"] == 0.0]
        expected = {id(p): 0.0 for p in no_decay["params"]}
        assert expected and len(expected) < len(decay)
        assert decay == {i: expected.get(i, wd) for i in decay}
    elif name.startswith(("vit", "resnet")):  # bias_decay: true
        assert set(decay.values()) == {wd}
