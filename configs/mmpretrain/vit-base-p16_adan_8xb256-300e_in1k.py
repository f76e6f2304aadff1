# ViT-B/16 with Adan, 300 epochs: zoo run ViT/base/args_vit-B_300 (zoo top-1 82.18 final / 82.30 best).
# Differs from the 150-epoch run in epochs, min_lr and warmup_lr only.  Batch: see the 150e config.
_base_ = ['./vit-base-p16_adan_8xb256-150e_in1k.py']

epochs = 300
param_scheduler = [
    dict(type='TimmCosineLR', t_initial=epochs, warmup_t=60, warmup_lr_init=1e-8, lr_min=1e-5,
         by_epoch=True, begin=0, end=epochs + 10),
]
train_cfg = dict(max_epochs=epochs + 10)
