"""Every option and recipe key of tools/train_timm.py is used, or warned about, or refused.

Systematic: every parser option and every key of every configs/timm YAML must be read by the
trainer (found in its source, or among the keys read by the timm helpers handed the whole
namespace), or be in the trainer's no-effect table (a recipe setting it gets a warning naming
it) or its refused table (a value other than "off", in a recipe or on the command line, is an
error naming it).  Recipe values are checked as the command line would parse them: a wrong
type is an error naming the key, generated over every typed option.
"""
import functools
import glob
import importlib.util
import inspect
import os
import re

import pytest
import torch
import yaml

import adan_plugin
from conftest import REPO_ROOT

TRAIN = os.path.join(REPO_ROOT, "tools", "train_timm.py")
spec = importlib.util.spec_from_file_location("train_timm", TRAIN)
train_timm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_timm)
from timm_train import config as cfg_module  # noqa: E402  (put on the path by train_timm)

RECIPES = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "timm", "**", "*.yaml"), recursive=True))
TRAINER_SOURCES = [TRAIN] + sorted(glob.glob(os.path.join(REPO_ROOT, "tools", "timm_train", "*.py"))) + [
    os.path.join(REPO_ROOT, "adan_plugin", "integrations", "timm.py")]
# options main() handles itself before a run
ENTRY_OPTIONS = {"config", "launch"}


@functools.lru_cache(maxsize=None)
def _trainer_reads():
    """Names the trainer reads from its namespace: ``args.<name>`` in its code, plus the keys of
    timm's helpers that take the whole namespace (optimizer_kwargs, resolve_data_config)."""
    from timm.data import resolve_data_config
    from timm.optim import _optim_factory
    code = "".join(open(p).read() for p in TRAINER_SOURCES if not p.endswith("config.py"))
    names = set(re.findall(r"\bargs\.([a-z_][a-z0-9_]*)", code))
    # code handed the whole namespace (or its dict): the names it looks up
    handed = inspect.getsource(_optim_factory.optimizer_kwargs) + inspect.getsource(resolve_data_config)
    handed += open(os.path.join(REPO_ROOT, "adan_plugin", "integrations", "timm.py")).read()
    names |= set(re.findall(r"cfg\.([a-z_]+)", handed)) | set(re.findall(r"""['"]([a-z_]+)['"]""", handed))
    return names


def _dests():
    return [a.dest for a in train_timm.build_parser()._actions if a.option_strings and a.dest != "help"]


def test_tables_are_disjoint_and_not_read():
    reads = _trainer_reads()
    assert not set(cfg_module._NO_EFFECT) & set(cfg_module._REFUSED)
    # a key the trainer acts on must not be listed as unused
    unused = set(cfg_module._NO_EFFECT) | set(cfg_module._REFUSED)
    assert not unused & reads, unused & reads


@pytest.mark.parametrize("dest", _dests())
def test_every_option_is_read_or_in_a_table(dest):
    tables = set(cfg_module._NO_EFFECT) | set(cfg_module._REFUSED)
    assert dest in _trainer_reads() or dest in tables or dest in ENTRY_OPTIONS, (
        f"--{dest.replace('_', '-')} is accepted but never read, and not in the warn/refuse tables")


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.relpath(p, REPO_ROOT) for p in RECIPES])
def test_every_recipe_key_is_read_or_in_a_table(recipe):
    with open(recipe) as f:
        keys = set(yaml.safe_load(f))
    reads, dests = _trainer_reads(), set(_dests())
    tables = (set(cfg_module._NO_EFFECT) | set(cfg_module._REFUSED) | set(cfg_module._RECIPE_ALIASES)
              | set(cfg_module._NOT_FROM_RECIPE))
    for key in keys:
        assert key in tables or (key in dests and (key in reads or key in ENTRY_OPTIONS)), key


def _yaml(tmp_path, **cfg):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "test_resnet", **cfg}))
    return str(path)


def _error(argv):
    with pytest.raises(SystemExit) as info:
        train_timm.parse_args(argv)
    assert info.value.code == 2
    return str(info.value)


@pytest.mark.parametrize("key", sorted(cfg_module._REFUSED))
def test_refused_keys_name_themselves_from_a_recipe_and_the_command_line(tmp_path, key, capsys):
    off = cfg_module._REFUSED[key]
    on = {bool: True, int: 2, float: 0.5, type(None): 0.3}[type(off)]
    assert f"{key}=" in _error(["--config", _yaml(tmp_path, **{key: on})])
    option = "--" + key.replace("_", "-")
    if key in _dests():
        assert f"{key}=" in _error([option] if isinstance(off, bool) else [option, str(on)])
    # the "off" value is accepted, with the warning that names it
    train_timm.parse_args(["--config", _yaml(tmp_path, **{key: off})])
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("key", sorted(set(cfg_module._NO_EFFECT) | set(cfg_module._NOT_FROM_RECIPE)))
def test_no_effect_keys_are_named_in_a_warning(tmp_path, key, capsys):
    train_timm.parse_args(["--config", _yaml(tmp_path, **{key: 1})])
    err = capsys.readouterr().err
    assert "warning" in err and f"{key}=1" in err


def test_native_amp_turns_amp_on(tmp_path):
    assert train_timm.parse_args(["--config", _yaml(tmp_path, native_amp=True)]).amp is True
    assert train_timm.parse_args(["--config", _yaml(tmp_path, native_amp=False)]).amp is False


def test_a_recipe_setting_a_resume_path_does_not_resume(tmp_path, capsys):
    args = train_timm.parse_args(["--config", _yaml(tmp_path, resume="/elsewhere/last.pth.tar")])
    assert args.resume == "" and "resume=" in capsys.readouterr().err


# ---------------------------------------------------------------- recipe values are typed like the command line
_WRONG = {
    int: [1.5, "abc", True, [1], {"a": 1}],
    float: ["abc", True, [0.1], {"a": 1}],
    "bool": ["maybe", 2.5, [True], {"a": 1}],
    "str": [3, 1.5, True, ["x"]],
    "list": ["x", 3, [None], [[1]], ["abc"]],
}


def _typed_actions():
    for action in train_timm.build_parser()._actions:
        if not action.option_strings or action.dest in ("help", "config", "launch", "opt_kwargs"):
            continue
        if action.dest in cfg_module._NO_EFFECT or action.dest in cfg_module._REFUSED or \
                action.dest in cfg_module._NOT_FROM_RECIPE:
            continue
        yield action


def _wrong_values(action):
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        values = list(_WRONG["list"])
        if isinstance(action.nargs, int):
            values.append([1] * (action.nargs + 1))
        return values
    if action.type is int:
        return _WRONG[int]
    if action.type in (float, cfg_module._opt_float):
        return _WRONG[float]
    if action.type is cfg_module._bool:
        return _WRONG["bool"]
    return _WRONG["str"]


CASES = [(a.dest, v) for a in _typed_actions() for v in _wrong_values(a)]


def test_a_wrongly_typed_recipe_value_is_an_error_naming_the_key(tmp_path):
    parser = train_timm.build_parser()
    assert len(CASES) > 300
    for key, value in CASES:
        with pytest.raises(SystemExit) as info:
            cfg_module.load_config(_yaml(tmp_path, **{key: value}), parser)
        msg = str(info.value)
        assert info.value.code == 2 and f": {key}: expected" in msg and repr(value) in msg, (key, value, msg)
    # and through the entry point, as a user meets it
    assert "epochs: expected an integer, got 1.5" in _error(["--config", _yaml(tmp_path, epochs=1.5)])


def test_well_typed_recipe_values_come_through_converted(tmp_path):
    args = train_timm.parse_args(["--config", _yaml(tmp_path, epochs=3, lr="1e-3", opt_betas=[0.98, 0.92, 0.99],
                                                    input_size=[3, 32, 32], pretrained="false", crop_pct=None,
                                                    img_size=None, aa="rand-m9", drop_path=None)])
    assert args.epochs == 3 and args.lr == 1e-3 and args.input_size == [3, 32, 32] and args.pretrained is False
    assert args.crop_pct is None and args.img_size is None and args.aa == "rand-m9"


def test_every_zoo_recipe_still_loads(capsys):
    for recipe in RECIPES:
        args = train_timm.parse_args(["--config", recipe])
        assert isinstance(args.epochs, int) and isinstance(args.lr, float)


# ---------------------------------------------------------------- help text and the READMEs' commands
def test_help_names_real_configs_and_the_low_memory_options(capsys):
    with pytest.raises(SystemExit):
        train_timm.parse_args(["--help"])
    text = capsys.readouterr().out
    named = re.findall(r"configs/[\w./-]+\.yaml", text)
    assert named and [p for p in named if not os.path.isfile(os.path.join(REPO_ROOT, p))] == []
    lines = [line for line in text.splitlines() if "state_dtype=8bit" in line]
    assert any("state_dtype=bfloat16" in line and "kahan_sum=True" in line for line in lines), lines


@pytest.mark.parametrize("readme", ["README.md", os.path.join("tools", "README.md")])
def test_readme_commands_run_the_trainers_through_an_interpreter(readme):
    # the scripts are not executable files: `tools/train_timm.py ...` alone fails with "Permission denied"
    commands, fence = [], None
    with open(os.path.join(REPO_ROOT, readme)) as f:
        for line in f:
            if line.startswith("```"):
                fence = line[3:].strip() if fence is None else None
            elif fence in ("", "bash", "sh", "console"):
                commands.append(line.strip())
    direct = [c for c in commands if c.split(" ", 1)[0].startswith("tools/")
              and not os.access(os.path.join(REPO_ROOT, c.split(" ", 1)[0]), os.X_OK)]
    assert direct == []
    assert readme != "README.md" or any(c.startswith("python tools/train_timm.py") for c in commands)


# ---------------------------------------------------------------- optimizer options
def test_the_opt_name_decides_no_prox_unless_it_is_given():
    from adan_plugin.integrations import timm as timm_integration

    def no_prox(*argv):
        args = train_timm.parse_args(["--lr", "0.01", *argv])
        return timm_integration.create_optimizer(torch.nn.Linear(3, 2), args).defaults["no_prox"]

    assert (no_prox("--opt", "adan"), no_prox("--opt", "adanw"), no_prox("--opt", "cadanw")) == (False, True, True)
    assert no_prox("--opt", "adanw", "--no-prox", "false") is False and no_prox("--opt", "adan", "--no-prox") is True
    if adan_plugin.fused_extension_available():  # 8-bit states need the kernels
        assert (no_prox("--opt", "adan8bit"), no_prox("--opt", "adanw8bit")) == (False, True)
        assert no_prox("--opt", "adanw8bit", "--no-prox", "false") is False


@pytest.mark.parametrize("value, dtype", [("bfloat16", "bfloat16"), ("torch.bfloat16", "bfloat16"),
                                          ("float32", "float32"), ("8bit", None)])
@pytest.mark.skipif(not adan_plugin.fused_extension_available(), reason="low-memory states need the kernels")
def test_state_dtype_by_name_on_the_command_line_and_in_a_recipe(tmp_path, value, dtype):
    from adan_plugin.integrations import timm as timm_integration
    expected = getattr(torch, dtype) if dtype else value
    recipe = _yaml(tmp_path, opt_kwargs={"state_dtype": value})
    for argv in (["--opt-kwargs", f"state_dtype={value}"], ["--config", recipe]):
        args = train_timm.parse_args(["--opt", "adan", "--lr", "0.01", *argv])
        optimizer = timm_integration.create_optimizer(torch.nn.Linear(3, 2), args)
        assert optimizer.defaults["state_dtype"] == expected, argv


def test_opt_kwargs_parse_text_values_whatever_timm_is_installed(monkeypatch, capsys):
    # timm 1.0.29's ParseKwargs let literal_eval's SyntaxError out, so the documented state_dtype=8bit
    # crashed the trainer on such a machine: the trainer parses --opt-kwargs itself.
    import argparse
    import ast

    import timm.utils

    class ParseKwargsOfTimm1029(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            kw = {}
            for value in values:
                key, value = value.split("=", 1)
                try:
                    kw[key] = ast.literal_eval(value)
                except ValueError:
                    kw[key] = str(value)
            setattr(namespace, self.dest, kw)

    monkeypatch.setattr(timm.utils, "ParseKwargs", ParseKwargsOfTimm1029)
    args = train_timm.parse_args(["--opt-kwargs", "state_dtype=8bit", "kahan_sum=True", "eps=1e-8", "note=a b",
                                  "path=x=y"])
    assert args.opt_kwargs == {"state_dtype": "8bit", "kahan_sum": True, "eps": 1e-8, "note": "a b", "path": "x=y"}
    with pytest.raises(SystemExit) as exit_info:
        train_timm.parse_args(["--opt-kwargs", "state_dtype"])
    assert exit_info.value.code == 2
    assert "--opt-kwargs: expected key=value pairs, got 'state_dtype'" in capsys.readouterr().err
