"""Adan learns real data: scikit-learn's digits to >= 95% validation accuracy."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adan_plugin import Adan
from adan_plugin.data import digits_tensors


@pytest.mark.parametrize("path", [dict(foreach=False, fused=False), dict(foreach=True, fused=False), dict()])
def test_digits_reach_95_percent(path):
    torch.manual_seed(0)
    x_tr, y_tr, x_va, y_va = digits_tensors()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = Adan(model.parameters(), lr=5e-3, weight_decay=0.02, max_grad_norm=5.0, **path)
    for _ in range(12):
        for idx in torch.randperm(len(y_tr)).split(64):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(x_va).argmax(1) == y_va).float().mean().item()
    assert acc >= 0.95, f"validation accuracy {acc:.3f}"
