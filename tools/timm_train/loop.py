"""The training step: loss, autocast context, one training epoch and validation."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch

from timm_train.runtime import fmt_time, is_main


def make_loss(args, mixup_active: bool):
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_active:
        # mixup/cutmix targets are already smoothed by the mixer
        if args.bce_loss:
            return BinaryCrossEntropy(target_threshold=args.bce_target_thresh)
        return SoftTargetCrossEntropy()
    if args.smoothing:
        if args.bce_loss:
            return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh)
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=args.bce_target_thresh)
    return torch.nn.CrossEntropyLoss()


def model_dtype(args):
    """The parameters' dtype (--model-dtype), None for the model's own (float32)."""
    return getattr(torch, args.model_dtype) if args.model_dtype else None


def model_inputs(inputs, args):
    """A batch as the model takes it: in the parameters' dtype (--model-dtype), channels-last if asked."""
    dtype = model_dtype(args)
    if dtype is not None:
        inputs = inputs.to(dtype)
    if args.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def amp_context(args, device):
    if not args.amp:
        return nullcontext, None
    dtype = torch.bfloat16 if (device.type == "cpu" or args.amp_dtype == "bfloat16") else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, lr_scheduler, autocast, scaler,
                    model_ema, mixup_fn, clock):
    from timm.utils import dispatch_clip_grad
    model.train()
    accum = max(1, args.grad_accum_steps)
    n_batches = len(loader)
    updates_per_epoch = (n_batches + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    loss_sum = torch.zeros((), device=device)
    seen = 0
    t_epoch = time.time()
    optimizer.zero_grad(set_to_none=True)
    for idx, (inputs, target) in enumerate(loader):
        last = idx == n_batches - 1
        need_update = last or (idx + 1) % accum == 0
        if not args.prefetcher:
            inputs, target = inputs.to(device), target.to(device)
            if mixup_fn is not None:
                inputs, target = mixup_fn(inputs, target)
        inputs = model_inputs(inputs, args)
        sync = nullcontext() if (need_update or not args.distributed) else model.no_sync()
        with sync:
            with autocast():
                # the loss in float32 whatever the parameters' dtype (--model-dtype)
                loss = loss_fn(model(inputs).float(), target)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if need_update:
            if args.clip_grad is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if model_ema is not None:
                model_ema.update(getattr(model, "module", model), step=num_updates)  # unwrapped from DDP
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
        loss_sum += loss.detach() * inputs.shape[0]
        seen += inputs.shape[0]
        clock["batches_done"] += 1
        if last or (idx + 1) % args.log_interval == 0:
            # checked where the loss is read anyway: no host sync on the other batches
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"loss is {loss.item()} at epoch {epoch} batch {idx}; stopping")
        if is_main(args) and (last or (idx + 1) % args.log_interval == 0):
            elapsed = time.time() - t_epoch
            rate = seen * args.world_size / max(elapsed, 1e-9)
            per_batch = (time.time() - clock["start"]) / clock["batches_done"]
            remaining = clock["total_batches"] - clock["batches_done"]
            lr = optimizer.param_groups[0]["lr"]
            print(f"Train: {epoch} [{idx + 1:>4d}/{n_batches} ({100.0 * (idx + 1) / n_batches:3.0f}%)]  "
                  f"loss {loss.item():.4f} (avg {loss_sum.item() / seen:.4f})  lr {lr:.3e}  "
                  f"{rate:.1f} img/s  ETA epoch {fmt_time(per_batch * (n_batches - idx - 1))} "
                  f"total {fmt_time(per_batch * remaining)}", flush=True)
    avg = loss_sum / max(seen, 1)
    if args.distributed:
        import torch.distributed as dist
        dist.all_reduce(avg)
        avg /= args.world_size
    return avg.item()


@torch.no_grad()
def validate(model, loader, args, device, autocast, num_classes):
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    k = min(5, num_classes)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    for inputs, target in loader:
        if not args.prefetcher:
            inputs, target = inputs.to(device), target.to(device)
        inputs = model_inputs(inputs, args)
        with autocast():
            output = model(inputs)
        output = output.float()
        hits = output.topk(k, dim=1).indices.eq(target[:, None])
        stats += torch.stack([loss_fn(output, target).double(), hits[:, 0].sum().double(),
                              hits.any(dim=1).sum().double(),
                              torch.tensor(float(target.shape[0]), device=device, dtype=torch.float64)])
    if args.distributed:
        import torch.distributed as dist
        dist.all_reduce(stats)
    loss, h1, h5, n = stats.tolist()
    return {"eval_loss": loss / n, "eval_top1": 100.0 * h1 / n, "eval_top5": 100.0 * h5 / n}
