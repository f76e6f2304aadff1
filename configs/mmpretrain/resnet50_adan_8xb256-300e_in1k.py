# ResNet-50 with Adan, 300 epochs: zoo run ResNet/Res50/args_res50_300 (zoo top-1 80.21).
# Differs from the 100-epoch run in epochs, lr 0.015, min_lr 1e-5, warmup_lr 1e-6 and
# train_interpolation bicubic (the 100e config already crops with bicubic).  Batch: see the 100e config.
_base_ = ['./resnet50_adan_8xb256-100e_in1k.py']

epochs = 300
optim_wrapper = dict(optimizer=dict(lr=0.015))
param_scheduler = [
    dict(type='TimmCosineLR', t_initial=epochs, warmup_t=60, warmup_lr_init=1e-6, lr_min=1e-5,
         by_epoch=True, begin=0, end=epochs + 10),
]
train_cfg = dict(max_epochs=epochs + 10)
