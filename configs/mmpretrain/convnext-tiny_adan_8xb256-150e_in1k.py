# ConvNeXt-T on ImageNet-1k with Adan, 150 epochs: the Adan zoo run ConvNext/small/args_cvnext_150
# (timm convnext_tiny_hnf, DeiT-style recipe, setting II; zoo top-1 81.72).  Every optimizer,
# schedule and augmentation value below is that run's; the YAML key is named where the names differ.
#
#   python tools/train_mm.py configs/mmpretrain/convnext-tiny_adan_8xb256-150e_in1k.py --launcher pytorch
#   (under `torchrun --nproc-per-node 8`; data in data/imagenet as mmpretrain's ImageNet expects)
#
# Batch: 256 images per process x 8 processes = 2048 global (batch_size is per process).  With fewer
# GPUs keep the global batch with gradient accumulation, e.g. 4 GPUs:
#   --cfg-options optim_wrapper.accumulative_counts=2
# or train a smaller global batch with the lr scaled linearly (--auto-scale-lr; base 2048).  The
# zoo numbers hold for 2048; linear scaling is a heuristic, not a reproduction.
_base_ = [
    'mmpretrain::_base_/models/convnext/convnext-tiny.py',  # mixup 0.8 / cutmix 1.0, smoothing 0.1
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',  # RandAugment m9-mstd0.5-inc, erasing 0.25
    'mmpretrain::_base_/schedules/imagenet_bs2048_AdamW.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['adan_plugin'], allow_failed_imports=False)

epochs = 150        # YAML epochs; timm adds cooldown_epochs=10 at min_lr
cooldown_epochs = 10

model = dict(
    # convnext_tiny_hnf ("head norm first"): the final LayerNorm before global pooling
    backbone=dict(drop_path_rate=0.1, gap_before_final_norm=False),  # drop_path
    neck=dict(type='GlobalAveragePooling'),
)

# color_jitter 0.4 is unused by timm when RandAugment is on; train_interpolation bicubic.
train_dataloader = dict(batch_size=256, num_workers=8)   # batch_size (per process), workers
val_dataloader = dict(batch_size=256)
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper', loss_scale='dynamic',          # amp
    optimizer=dict(
        type='Adan', lr=0.015, weight_decay=0.04,          # lr, weight_decay
        betas=(0.98, 0.92, 0.99), eps=1e-8,                # opt_betas, opt_eps
        max_grad_norm=0.0, no_prox=False),                 # max_grad_norm 0: no clipping
    # bias_decay: false -> as timm: no weight decay on biases, norms and every other 1-d
    # parameter (ConvNeXt's layer-scale gammas)
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0),
)

param_scheduler = [
    dict(type='TimmCosineLR', t_initial=epochs, warmup_t=60, warmup_lr_init=1e-8, lr_min=1e-4,
         by_epoch=True, begin=0, end=epochs + cooldown_epochs),  # sched cosine, warmup_epochs, warmup_lr, min_lr
]
train_cfg = dict(by_epoch=True, max_epochs=epochs + cooldown_epochs, val_interval=1)
auto_scale_lr = dict(base_batch_size=2048)
randomness = dict(seed=42, deterministic=False)            # seed
