# Adan on scikit-learn's digits with LeNet-5: the OpenMMLab quick start (CPU, about a minute)
# and the config the tests train.
#
#   python tools/train_mm.py configs/mmpretrain/lenet5_adan_digits.py
#
# The data is the digits ImageFolder (32x32, train/ and val/, one folder per class) that
# adan_plugin.data.write_digits_imagefolder writes; tools/train_mm.py writes it to
# `digits_imagefolder` when it is missing.  Other launchers (mmpretrain's tools/train.py,
# `mim train`) need it written first:
#   python -c "from adan_plugin.data import write_digits_imagefolder as w; w('data/digits_32px')"
# Set ADAN_DIGITS_ROOT to keep it elsewhere.
# Self-contained on purpose: mmpretrain's tools/train.py parses a config before it imports
# anything, so this file names nothing but mmpretrain's and mmengine's registered types.
default_scope = 'mmpretrain'

# Registers Adan/FusedAdan into mmengine's OPTIMIZERS, also when a launcher that knows nothing
# of adan_plugin (mmpretrain's tools/train.py, mim) runs this file.
custom_imports = dict(imports=['adan_plugin'], allow_failed_imports=False)

data_root = '{{$ADAN_DIGITS_ROOT:data/digits_32px}}'
digits_imagefolder = data_root

model = dict(
    type='ImageClassifier',
    backbone=dict(type='LeNet5', num_classes=10),
    neck=None,
    head=dict(type='ClsHead', loss=dict(type='CrossEntropyLoss', loss_weight=1.0)),
)

# LeNet-5 takes one channel: the images are read as grayscale; mean/std of the train split.
data_preprocessor = dict(num_classes=10, mean=[77.8], std=[82.5])
pipeline = [dict(type='LoadImageFromFile', color_type='grayscale'), dict(type='PackInputs')]

train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,  # needs workers; mmpretrain's train.py turns it on unless set
    pin_memory=False,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train', pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=256,
    num_workers=0,
    persistent_workers=False,  # needs workers; mmpretrain's train.py turns it on unless set
    pin_memory=False,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val', pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# Adan: peak lr about 5-10x AdamW's, the paper's betas (code convention: 1 - beta), weight
# decay 0.02 on weights only, global-norm clipping inside the optimizer (max_grad_norm), not
# the wrapper's clip_grad.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        type='Adan', lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02,
        max_grad_norm=5.0, no_prox=False),
    paramwise_cfg=dict(bias_decay_mult=0.0, norm_decay_mult=0.0),
)

max_epochs = 10
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=5),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
