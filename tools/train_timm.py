#!/usr/bin/env python
"""Train a timm model with Adan from a zoo recipe (configs/timm/*.yaml) -- or launch timm's train.py.

The entry point: ``train()`` (one run) and ``main()`` (the command line,
``--compare-adamw``, ``--launch``).  The usage, outputs and ``--launch``
mode are described in timm_train/config.py (the ``--help`` text); the
other pieces live beside it in timm_train/ (see its ``__init__.py``).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

import adan_plugin  # noqa: F401  (registers Adan into timm)
import adan_plugin.checkpoint
from adan_plugin.hparams import SCRATCH_LR_SCALE

# timm_train/ sits beside this file; put it on the path also when this file is
# loaded by path (importlib in the tests) rather than run as a script.
_TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TOOLS_DIR not in sys.path:
    sys.path.insert(0, _TOOLS_DIR)

# Re-exported: these names stay importable as train_timm.<name>.
from timm_train.checkpoint import (  # noqa: E402,F401
    CHECKPOINT_VERSION, check_resume, describe_overrides, hyperparameters, load_checkpoint, load_model_state,
    overridden_by_checkpoint, record_overrides, save_checkpoint, state_format_changes)
from timm_train.config import (  # noqa: E402,F401
    _NO_EFFECT, _RECIPE_ALIASES, _REFUSED, ConfigError, _bool, _opt_float, build_parser, load_config, parse_args)
from timm_train.launcher import _ADAN_FLAGS, split_launch_args  # noqa: E402,F401
from timm_train.loop import amp_context, make_loss, model_dtype, train_one_epoch, validate  # noqa: E402,F401
from timm_train.runtime import (  # noqa: E402,F401
    create_model, epoch_seed, fmt_time, is_main, log, output_dir_for, plain, resolve_data_dir, seed_all,
    setup_distributed)
from timm_train.summary import SUMMARY_COLUMNS, plot_runs, read_summary, write_summary  # noqa: E402,F401


def train(args) -> Dict[str, Any]:
    """Run the recipe in ``args``; returns the final and best metrics."""
    import timm
    from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, distribute_bn

    # by name: the registration into timm imports this module lazily, on timm's first import
    from adan_plugin.integrations import timm as timm_integration

    device = setup_distributed(args)
    timm_integration.fix_randaugment_posterize()
    if args.lr is None:
        raise ConfigError("no learning rate: give --lr or a --config that sets lr")
    if args.grad_accum_steps < 1:
        raise ConfigError(f"--grad-accum-steps must be >= 1, got {args.grad_accum_steps}")
    if args.aug_repeats and not args.distributed:
        log(args, f"note: aug_repeats={args.aug_repeats:g} needs a distributed run (timm's RepeatAugSampler); "
                  "it is off for this single-process run")
        args.aug_repeats = 0
    seed_all(args.seed + args.rank)
    data_dir = resolve_data_dir(args)

    # datasets first: an ImageFolder tells the number of classes
    class_map = args.class_map or ""
    dataset_train = create_dataset(args.dataset, root=data_dir, split=args.train_split, is_training=True,
                                   class_map=class_map, batch_size=args.batch_size, seed=args.seed)
    dataset_eval = create_dataset(args.dataset, root=data_dir, split=args.val_split, is_training=False,
                                  class_map=class_map, batch_size=args.batch_size)
    num_classes = args.num_classes
    if num_classes is None:
        reader = getattr(dataset_train, "reader", None)
        num_classes = len(getattr(reader, "class_to_idx", {}) or {}) or 1000
    args.num_classes = num_classes

    model = create_model(args, num_classes)
    if args.initial_checkpoint:
        load_model_state(model, load_checkpoint(args.initial_checkpoint)["state_dict"], args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    model.to(device=device, dtype=model_dtype(args))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm); drop it for CPU runs")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    try:
        optimizer = timm_integration.create_optimizer(model, args)
    except (ValueError, TypeError) as err:
        # built from the user's options only (an unknown --opt, a keyword the optimizer does not
        # take, a value it refuses): their mistake, told in one line like every other
        raise ConfigError(f"--opt {args.opt}: {' '.join(str(err).split())}") from None
    autocast, scaler = amp_context(args, device)

    start_epoch, best = 0, None
    output_dir = output_dir_for(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        done = check_resume(ckpt, args.resume, args)
        load_model_state(model, ckpt["state_dict"], args.resume)
        fresh = adan_plugin.checkpoint.missing_optimizer_state(ckpt)
        if args.no_resume_opt:
            log(args, "--no-resume-opt: the optimizer starts afresh (moments from zero)")
        elif fresh is not None:
            log(args, f"WARNING: checkpoint {args.resume}: {fresh}; the optimizer's moments restart from zero "
                      f"(--allow-fresh-optimizer-state)")
        else:
            asked = hyperparameters(optimizer)
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as err:
                raise ConfigError(f"checkpoint {args.resume!r}: its optimizer state does not fit: {err}") from None
            changed = state_format_changes(ckpt["optimizer"].get("param_groups"), optimizer.param_groups)
            if changed:
                log(args, f"WARNING: checkpoint {args.resume}: {changed}")
            overridden = overridden_by_checkpoint(asked, hyperparameters(optimizer))
            if overridden:
                # load_state_dict takes the hyper-parameters from the checkpoint: say so, and
                # record what runs rather than what was asked (args.yaml, the checkpoints)
                log(args, f"WARNING: checkpoint {args.resume}: its optimizer hyper-parameters win over the "
                          f"command line's: {describe_overrides(overridden)}")
                record_overrides(args, overridden)
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
        start_epoch = done + 1
        best = ckpt.get("best")
        log(args, f"resumed from {args.resume} (epoch {done}); continuing at epoch {start_epoch}")
    if args.start_epoch is not None:
        start_epoch = args.start_epoch

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
        if ckpt is not None and ckpt.get("state_dict_ema") is not None:
            model_ema.module.load_state_dict(ckpt["state_dict_ema"])

    train_model = model
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    # loaders, mixup
    args.prefetcher = not args.no_prefetcher
    mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    mixup_fn, collate_fn = None, None
    if mixup_active:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
    loader_common = dict(mean=data_config["mean"], std=data_config["std"], num_workers=args.workers,
                         distributed=args.distributed, pin_memory=args.pin_mem, device=device,
                         use_prefetcher=args.prefetcher, persistent_workers=False)
    loader_train = create_loader(
        dataset_train, input_size=data_config["input_size"], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_split=args.resplit, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        interpolation=train_interpolation, collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader, **loader_common)
    loader_eval = create_loader(
        dataset_eval, input_size=data_config["input_size"], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
        **loader_common)

    loss_fn = make_loss(args, mixup_active).to(device)
    accum = max(1, args.grad_accum_steps)
    updates_per_epoch = (len(loader_train) + accum - 1) // accum
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs,
        patience_epochs=args.patience_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
        noise=args.lr_noise, noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
        cycle_mul=args.lr_cycle_mul, cycle_decay=args.lr_cycle_decay, cycle_limit=args.lr_cycle_limit,
        k_decay=args.lr_k_decay, step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    rows: List[Dict[str, Any]] = []
    if is_main(args):
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "args.yaml"), "w") as f:
            yaml.safe_dump(plain({k: v for k, v in vars(args).items() if k not in ("prefetcher",)}), f,
                           sort_keys=True)
        # a resumed run keeps the rows before its start and rewrites the rest
        rows = [r for r in read_summary(os.path.join(output_dir, "summary.csv")) if int(r["epoch"]) < start_epoch]
    log(args, f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"{args.model_dtype or 'float32'} params), "
              f"optimizer {type(optimizer).__name__} ({args.opt}, fused backends "
              f"{getattr(optimizer, 'fused_backends', 'n/a')}), {num_epochs} epochs "
              f"({args.epochs} + {args.cooldown_epochs} cooldown), global batch "
              f"{args.batch_size * args.world_size * accum}, {len(dataset_train)} train / {len(dataset_eval)} val "
              f"images, device {device}, output {output_dir}")

    clock = {"start": time.time(), "batches_done": 0,
             "total_batches": len(loader_train) * max(0, num_epochs - start_epoch)}
    metrics: Dict[str, float] = {}
    eval_metric = "eval_" + args.eval_metric if not args.eval_metric.startswith("eval_") else args.eval_metric
    for epoch in range(start_epoch, num_epochs):
        seed_all(epoch_seed(args, epoch))
        if args.distributed and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        if args.prefetcher and args.mixup_off_epoch and epoch >= args.mixup_off_epoch and collate_fn is not None:
            collate_fn.mixup_enabled = False
        elif mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(epoch, train_model, loader_train, optimizer, loss_fn, args, device,
                                     lr_scheduler, autocast, scaler, model_ema, mixup_fn, clock)
        if args.distributed and args.dist_bn in ("broadcast", "reduce"):
            distribute_bn(model, args.world_size, args.dist_bn == "reduce")
        metrics = validate(model, loader_eval, args, device, autocast, num_classes)
        if model_ema is not None and not args.model_ema_force_cpu:
            # like the zoo's timm train.py: with EMA on, the EMA weights are the ones logged
            if args.distributed and args.dist_bn in ("broadcast", "reduce"):
                distribute_bn(model_ema, args.world_size, args.dist_bn == "reduce")
            metrics = validate(model_ema.module, loader_eval, args, device, autocast, num_classes)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, metrics[eval_metric])
        row = {"epoch": epoch, "train_loss": train_loss, **metrics, "lr": lr}
        if is_main(args):
            rows.append(row)
            write_summary(os.path.join(output_dir, "summary.csv"), rows)
            improved = best is None or metrics[eval_metric] > best["value"]
            if improved:
                best = {"value": metrics[eval_metric], "epoch": epoch}
            state = {"version": CHECKPOINT_VERSION, "epoch": epoch, "arch": args.model,
                     "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "metric": metrics[eval_metric], "best": best, "args": plain(vars(args))}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if model_ema is not None:
                state["state_dict_ema"] = model_ema.module.state_dict()
            save_checkpoint(os.path.join(output_dir, "last.pth.tar"), state)
            if improved:
                save_checkpoint(os.path.join(output_dir, "model_best.pth.tar"), state)
            if args.checkpoint_hist > 0:
                save_checkpoint(os.path.join(output_dir, f"checkpoint-{epoch}.pth.tar"), state)
                stale = os.path.join(output_dir, f"checkpoint-{epoch - args.checkpoint_hist}.pth.tar")
                if os.path.exists(stale):
                    os.remove(stale)
            print(f"Epoch {epoch}: train_loss {train_loss:.4f}  eval_loss {metrics['eval_loss']:.4f}  "
                  f"top1 {metrics['eval_top1']:.2f}%  top5 {metrics['eval_top5']:.2f}%  lr {lr:.3e}  "
                  f"elapsed {fmt_time(time.time() - clock['start'])}", flush=True)

    if args.distributed:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    result = {"output_dir": output_dir, "final_top1": metrics.get("eval_top1"),
              "best_top1": best["value"] if best else None, "best_epoch": best["epoch"] if best else None}
    if is_main(args) and metrics:
        print(f"final top-1: {metrics['eval_top1']:.2f}%  (best {best['value']:.2f}% at epoch {best['epoch']})  "
              f"-> {output_dir}/summary.csv", flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--launch" in argv:
        script, rest, adan = split_launch_args(argv)
        if not os.path.isfile(script):
            raise ConfigError(f"--launch: no training script at {script!r}")
        # by name: nothing has imported timm yet, so the lazy registration has not loaded this module
        from adan_plugin.integrations import timm as timm_integration
        timm_integration.launch_upstream_train(script, rest, adan)
        return {}
    args = parse_args(argv)
    result = train(args)
    out = result["output_dir"]
    if args.compare_adamw and args.rank == 0 and not args.distributed:
        adamw = parse_args(argv)
        adamw.opt = "adamw"
        # default: the translation helper's rule (Adan lr = 5 x AdamW lr) run backwards
        adamw.lr = args.adamw_lr if args.adamw_lr is not None else args.lr / SCRATCH_LR_SCALE
        adamw.weight_decay = args.adamw_weight_decay
        adamw.max_grad_norm, adamw.no_prox, adamw.opt_kwargs = 0.0, False, {}
        # Adan's betas (three, for other moments) mean nothing to AdamW: its own defaults unless asked
        adamw.opt_betas = args.adamw_betas
        adamw.output, adamw.experiment, adamw.resume = os.path.join(out, "adamw"), "", ""
        betas = "AdamW's default (0.9, 0.999)" if adamw.opt_betas is None else tuple(adamw.opt_betas)
        print(f"\n=== same recipe with AdamW (lr {adamw.lr:g}, weight decay {adamw.weight_decay:g}, betas {betas}) "
              f"===", flush=True)
        result["adamw"] = train(adamw)
        if args.plot:
            plot_runs(os.path.join(out, "adan_vs_adamw.png"),
                      {f"Adan (lr {args.lr:g})": os.path.join(out, "summary.csv"),
                       f"AdamW (lr {adamw.lr:g})": os.path.join(out, "adamw", "summary.csv")})
        print(f"final top-1: Adan {result['final_top1']:.2f}%  AdamW {result['adamw']['final_top1']:.2f}%",
              flush=True)
    elif args.plot and args.rank == 0 and result.get("final_top1") is not None:
        plot_runs(os.path.join(out, "summary.png"), {args.opt: os.path.join(out, "summary.csv")})
    return result


if __name__ == "__main__":
    from dist_exit import exit_process  # beside this script

    try:
        main()
    except ConfigError as err:
        print(err, file=sys.stderr, flush=True)
        exit_process(2)
    exit_process(0)
