#!/usr/bin/env python
"""Translate an AdamW recipe into an Adan starting point (authors' published guidance).

    python tools/adamw_to_adan.py --lr 2e-3 --weight-decay 0.05 --warmup-epochs 5 --epochs 300
    python tools/adamw_to_adan.py --lr 1e-4 --finetune --format yaml

The guidance and its source are in adan_plugin/hparams.py (``adamw_to_adan``).
"""
import argparse
import json
import sys

import yaml

from adan_plugin.hparams import adamw_to_adan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, required=True, help="AdamW peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    ap.add_argument("--warmup-epochs", type=float, default=None, help="AdamW warmup (same unit as --epochs)")
    ap.add_argument("--epochs", type=float, default=None, help="training length")
    ap.add_argument("--betas", type=float, nargs=2, default=None, help="AdamW (beta1, beta2)")
    ap.add_argument("--finetune", action="store_true", help="fine-tuning a pre-trained model (lr x2)")
    ap.add_argument("--lr-scale", type=float, default=None, help="override the lr multiplier")
    ap.add_argument("--format", choices=["text", "yaml", "json", "args"], default="text")
    args = ap.parse_args(argv)
    try:
        recipe = adamw_to_adan(args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                               betas=args.betas, epochs=args.epochs, finetune=args.finetune,
                               lr_scale=args.lr_scale)
    except ValueError as err:
        ap.error(str(err))
    keys = {"opt": "adan", "lr": recipe.lr, "weight_decay": recipe.weight_decay,
            "opt_betas": list(recipe.betas), "opt_eps": recipe.eps}
    if recipe.warmup_epochs is not None:
        keys["warmup_epochs"] = recipe.warmup_epochs
    if args.format == "json":
        print(json.dumps({**keys, "notes": recipe.notes}, indent=2))
    elif args.format == "yaml":
        print("# " + "\n# ".join(recipe.notes))
        print(yaml.safe_dump(keys, sort_keys=False), end="")
    elif args.format == "args":
        print(" ".join(recipe.timm_args()))
    else:
        for note in recipe.notes:
            print(note)
        print("timm / tools/train_timm.py flags: " + " ".join(recipe.timm_args()))
    return recipe


if __name__ == "__main__":
    main(sys.argv[1:])
