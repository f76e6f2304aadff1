# ViT-B/16 with Adan, 300 epochs, tuned: zoo run ViT/base/args_vit-B_300_T (zoo top-1 82.55 / 82.58).
# Differs from the 300-epoch run in drop_path 0.2, warmup 90 epochs, min_lr 1e-6 and seed 3407.
_base_ = ['./vit-base-p16_adan_8xb256-150e_in1k.py']

epochs = 300
model = dict(backbone=dict(drop_path_rate=0.2))
param_scheduler = [
    dict(type='TimmCosineLR', t_initial=epochs, warmup_t=90, warmup_lr_init=1e-8, lr_min=1e-6,
         by_epoch=True, begin=0, end=epochs + 10),
]
train_cfg = dict(max_epochs=epochs + 10)
randomness = dict(seed=3407)
