"""AdamW -> Adan translation helper and its CLI."""
import importlib.util
import json
import math
import os
import contextlib
import io

import pytest

from adan_plugin import hparams
from adan_plugin.hparams import adamw_to_adan
from conftest import REPO_ROOT


def test_from_scratch_recipe_deit_small():
    # DeiT-S with AdamW: lr 5e-4 x 2048/512 = 2e-3, wd 0.05, warmup 5 of 300 epochs
    r = adamw_to_adan(2e-3, weight_decay=0.05, warmup_epochs=5, betas=(0.9, 0.999), epochs=300)
    assert math.isclose(r.lr, 1e-2) and 5 <= r.lr / 2e-3 <= 10
    assert r.weight_decay == 0.02 and r.betas == (0.98, 0.92, 0.99) and r.eps == 1e-8
    assert r.warmup_epochs == 60  # as the zoo's ViT-S 300 recipe
    assert any("0.05" in n for n in r.notes) and any("(0.9, 0.999)" in n for n in r.notes)


@pytest.mark.parametrize("epochs,adamw_warmup,expected", [(150, 5, 60), (100, 5, 40), (300, 40, 80), (10, 1, 4)])
def test_warmup_is_longer_at_large_lr(epochs, adamw_warmup, expected):
    assert adamw_to_adan(1e-3, warmup_epochs=adamw_warmup, epochs=epochs).warmup_epochs == expected


def test_finetune_doubles_lr_and_keeps_warmup():
    r = adamw_to_adan(1e-4, weight_decay=0.05, warmup_epochs=2, epochs=30, finetune=True)
    assert math.isclose(r.lr, 2e-4) and r.warmup_epochs == 2 and r.weight_decay == 0.02


def test_lr_scale_override_and_no_warmup_given():
    r = adamw_to_adan(1e-3, lr_scale=10, epochs=200)
    assert math.isclose(r.lr, 1e-2) and r.warmup_epochs == 60
    assert adamw_to_adan(1e-3).warmup_epochs is None


@pytest.mark.parametrize("kwargs,word", [({"lr": 0}, "lr"), ({"lr": -1e-3}, "lr"), ({"lr": float("nan")}, "lr"),
                                         ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay"),
                                         ({"lr": 1e-3, "betas": (0.9, 1.5)}, "betas"),
                                         ({"lr": 1e-3, "epochs": 0}, "epochs")])
def test_bad_input_is_a_clear_error(kwargs, word):
    with pytest.raises(ValueError, match=word):
        adamw_to_adan(**kwargs)


def test_docstring_states_guidance_and_source():
    doc = hparams.__doc__
    assert "2208.06677" in doc and "github.com/sail-sg/Adan" in doc
    for fact in ("5-10x", "2x", "0.02", "(0.98, 0.92, 0.99)", "warmup"):
        assert fact in doc, fact


def test_timm_args_feed_the_trainer():
    spec = importlib.util.spec_from_file_location("train_timm", os.path.join(REPO_ROOT, "tools", "train_timm.py"))
    train_timm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_timm)
    r = adamw_to_adan(2e-3, warmup_epochs=5, epochs=300)
    args = train_timm.parse_args(r.timm_args())
    assert (args.opt, args.lr, args.weight_decay, args.opt_betas, args.warmup_epochs) == (
        "adan", r.lr, 0.02, [0.98, 0.92, 0.99], 60)


def test_cli_json():
    spec = importlib.util.spec_from_file_location("adamw_to_adan", os.path.join(REPO_ROOT, "tools", "adamw_to_adan.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["--lr", "4e-3", "--weight-decay", "0.05", "--warmup-epochs", "20", "--epochs", "300",
                  "--format", "json"])
    data = json.loads(out.getvalue())
    assert data["opt"] == "adan" and math.isclose(data["lr"], 0.02) and data["warmup_epochs"] == 60
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        cli.main(["--lr", "-1"])
