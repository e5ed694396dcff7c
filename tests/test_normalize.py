"""REPAIR / RESCALE hit their goal statistics and are fused into the model's own weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoperm


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double().eval()


def pre_activations(model, x):
    h1 = model[0](x)
    h2 = model[2](torch.relu(h1))
    return [h1, h2]


@pytest.mark.parametrize("mode", ["repair", "rescale"])
def test_goal_statistics_are_reached(mode):
    a, b = mlp(1), mlp(2)
    data = [torch.randn(64, 5, dtype=torch.float64) for _ in range(4)]
    x = torch.cat(data)
    alpha = 0.3
    spec = autoperm.trace(a, data[0])
    perms = autoperm.align(a, b, spec)
    b_aligned = autoperm.permute(b, spec, perms)
    merged = autoperm.merge(a, b, spec=spec, alpha=alpha, normalize=mode, data=data)
    assert type(merged) is nn.Sequential and set(merged.state_dict()) == set(a.state_dict())
    with torch.no_grad():
        for fa, fb, fm in zip(pre_activations(a, x), pre_activations(b_aligned, x), pre_activations(merged, x)):
            goal_std = (1 - alpha) * fa.std(0, unbiased=False) + alpha * fb.std(0, unbiased=False)
            assert torch.allclose(fm.std(0, unbiased=False), goal_std, rtol=1e-6)
            goal_mean = (1 - alpha) * fa.mean(0) + alpha * fb.mean(0)
            if mode == "repair":
                assert torch.allclose(fm.mean(0), goal_mean, atol=1e-6)
            else:
                assert not torch.allclose(fm.mean(0), goal_mean, atol=1e-3), "RESCALE leaves means alone"


def test_repair_resets_batchnorm_exactly():
    torch.manual_seed(0)
    def net():
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                             nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    a, b = net(), net()
    data = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    merged = autoperm.merge(a, b, normalize="repair", data=data)
    with torch.no_grad():
        h = merged[0](torch.cat(data))
    assert torch.allclose(merged[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(merged[1].running_var, h.var((0, 2, 3), unbiased=False), rtol=1e-4)


def test_interpolation_curve_and_barriers():
    a, b = mlp(1), mlp(2)
    x = torch.randn(32, 5, dtype=torch.float64)
    curve = autoperm.interpolate(a, b, [0, 0.5, 1], lambda m: {"loss": m(x).pow(2).mean().item()})
    ends = [curve.values[0]["loss"], curve.values[2]["loss"]]
    assert ends[0] == pytest.approx(a(x).pow(2).mean().item())
    assert ends[1] == pytest.approx(b(x).pow(2).mean().item())
    assert curve.loss_barrier() == pytest.approx(max(0.0, curve.values[1]["loss"] - sum(ends) / 2))
    assert autoperm.accuracy_barrier([0, 0.5, 1], [0.9, 0.5, 0.8]) == pytest.approx(0.35)
    assert autoperm.loss_barrier([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="alpha = 0 and alpha = 1"):
        autoperm.loss_barrier([0.5], [1.0])
