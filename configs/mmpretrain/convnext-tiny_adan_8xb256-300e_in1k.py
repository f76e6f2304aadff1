# ConvNeXt-T with Adan, 300 epochs: zoo run ConvNext/small/args_cvnext_300 (zoo top-1 82.44 / 82.45).
# Differs from the 150-epoch run in epochs, lr 0.016, betas (0.98, 0.92, 0.90), weight decay 0.02,
# warmup 150 epochs and model EMA (decay 0.9999).  timm's train_interpolation 'random' (bilinear or
# bicubic per image) stays bicubic here.  Batch: see the 150e config.
_base_ = ['./convnext-tiny_adan_8xb256-150e_in1k.py']

epochs = 300
optim_wrapper = dict(optimizer=dict(lr=0.016, weight_decay=0.02, betas=(0.98, 0.92, 0.9)))
param_scheduler = [
    dict(type='TimmCosineLR', t_initial=epochs, warmup_t=150, warmup_lr_init=1e-8, lr_min=1e-4,
         by_epoch=True, begin=0, end=epochs + 10),
]
train_cfg = dict(max_epochs=epochs + 10)
custom_hooks = [dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]  # model_ema_decay 0.9999
