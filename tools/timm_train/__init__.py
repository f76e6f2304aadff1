"""The pieces of tools/train_timm.py (the entry point, which keeps ``train()`` and ``main()``).

    config.py      command line and recipe YAML: build_parser, load_config, parse_args, ConfigError
    opt_kwargs.py  ``--opt-kwargs k=v``: the values as the trainer and ``--launch`` read them
    runtime.py     run bookkeeping: seeding, rank-0 logging, distributed setup, data root, model, output folder
    checkpoint.py  checkpoint save/load (``torch.load(weights_only=True)``); the hyper-parameters a
                   resumed optimizer state overrides
    summary.py     summary.csv read/write and the loss/accuracy plots
    loop.py        one training epoch, validation, the loss and the autocast context
    launcher.py    ``--launch``: the argv split for an upstream timm train.py
"""
