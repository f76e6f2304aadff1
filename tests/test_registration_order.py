"""Registration works whichever is imported first, and `import adan_plugin` stays light."""
import subprocess
import sys
import textwrap

import pytest

CHECK = """
from timm.optim import create_optimizer_v2
import torch
from mmengine.registry import OPTIMIZERS
from mmpretrain.registry import OPTIMIZERS as MMPRETRAIN_OPTIMIZERS
import adan_plugin
model = torch.nn.Linear(3, 2)
assert type(create_optimizer_v2(model, "adan")) is adan_plugin.Adan
assert create_optimizer_v2(model, "adanw").param_groups[0]["no_prox"] is True
assert OPTIMIZERS.get("Adan") is adan_plugin.Adan
assert MMPRETRAIN_OPTIMIZERS.get("Adan") is adan_plugin.Adan
print("ok")
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_plugin_first_does_not_import_the_trainers_and_registers_on_their_import():
    out = _run(textwrap.dedent("""
        import sys
        import adan_plugin
        assert "timm" not in sys.modules and "mmengine" not in sys.modules, "import adan_plugin pulled them in"
    """) + CHECK)
    assert out.strip().endswith("ok")


@pytest.mark.parametrize("first", ["timm", "mmengine.registry", "mmpretrain.registry"])
def test_trainer_first_registers_at_plugin_import(first):
    out = _run(f"import {first}\nimport adan_plugin\n" + CHECK)
    assert out.strip().endswith("ok")
