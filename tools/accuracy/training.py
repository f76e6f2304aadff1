"""One accuracy run: the recipe's optimizer and schedule, the training loop, the evaluation."""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import torch

from .data import digits_images, epoch_batches, eval_transform, stratified_subset, train_transform
from .experiments import CONFIGS, TASKS, Config, Task

def build_optimizer(model: torch.nn.Module, task: Task, config: Config):
    from timm.optim._param_groups import param_groups_weight_decay

    from adan_plugin import Adan

    groups = param_groups_weight_decay(model, task.weight_decay)
    return Adan(groups, lr=task.lr, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=task.weight_decay,
                max_grad_norm=5.0, no_prox=False, **config.opt_kwargs)


def build_scheduler(optimizer, task: Task, epochs: int):
    from timm.scheduler import create_scheduler_v2
    sched, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, cooldown_epochs=0,
                                   min_lr=task.min_lr, warmup_lr=task.warmup_lr, warmup_epochs=task.warmup_epochs,
                                   step_on_epochs=True)
    return sched


@torch.no_grad()
def evaluate(model, x_val, y_val, dtype) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(y_val), 256):
        logits = model(x_val[i:i + 256].to(dtype)).float()
        hits += int((logits.argmax(1) == y_val[i:i + 256]).sum())
    return 100.0 * hits / len(y_val)


def run_one(task_name: str, config_name: str, seed: int, epochs: Optional[int] = None,
            train_limit: Optional[int] = None, threads: int = 1) -> Dict[str, Any]:
    """Train one (task, configuration, seed); returns the result row (curve = top-1 after each epoch).

    Runs with ``threads`` intra-op threads and restores the caller's count afterwards: a caller in
    the same process (the tests) would otherwise train with one thread, and a different thread
    count changes the rounding of reductions, hence the result of everything it runs next."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(task_name, config_name, seed, epochs, train_limit)
    finally:
        torch.set_num_threads(before)


def _train(task_name: str, config_name: str, seed: int, epochs: Optional[int],
           train_limit: Optional[int]) -> Dict[str, Any]:
    import timm
    from timm.loss import LabelSmoothingCrossEntropy

    import adan_plugin  # noqa: F401

    task, config = TASKS[task_name], CONFIGS[config_name]
    epochs = epochs or task.epochs
    train, val = digits_images()
    keep = stratified_subset([label for _, label in train], task.train_fraction)
    if train_limit:
        keep = keep[:train_limit]
    images, labels = [train[i][0] for i in keep], [train[i][1] for i in keep]
    tf_eval = eval_transform()
    x_val = torch.stack([tf_eval(img) for img, _ in val])
    y_val = torch.tensor([label for _, label in val])
    tf_train = train_transform(task)

    torch.manual_seed(seed)
    model = timm.create_model(task.model, num_classes=10, **task.model_kwargs).to(config.param_dtype)
    optimizer = build_optimizer(model, task, config)
    scheduler = build_scheduler(optimizer, task, epochs)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=task.smoothing)

    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    curve, losses, lrs, unchanged = [], [], [], []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        batches = epoch_batches(images, labels, tf_train, task.batch_size, seed, epoch)
        # Which weights a whole epoch of updates leaves bit-identical: the updates that rounding to
        # the parameter's dtype swallows (bf16 without compensation), ~0 for fp32 parameters.
        start = [p.detach().clone() for p in params]
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for x, y in batches:
            loss = loss_fn(model(x.to(config.param_dtype)).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * len(y)
        scheduler.step(epoch + 1)
        train_loss = float(loss_sum) / len(labels)
        if not math.isfinite(train_loss):
            raise RuntimeError(f"{task_name}/{config_name}/seed {seed}: loss {train_loss} in epoch {epoch}")
        losses.append(train_loss)
        unchanged.append(sum(int((p.detach() == s).sum()) for p, s in zip(params, start)) / n_params)
        curve.append(evaluate(model, x_val, y_val, config.param_dtype))
    return dict(task=task_name, config=config_name, seed=seed, epochs=epochs, train_images=len(labels),
                final_top1=curve[-1], curve=curve, train_loss=losses, lr=lrs, unchanged=unchanged,
                wall_s=time.perf_counter() - t0)
