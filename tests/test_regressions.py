"""Cases found by adversarial review: each was unsound or crashed before its fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import autoperm
from helpers import float64_inputs


def assert_sound(model, x):
    spec = autoperm.trace(model, x, verify=False)
    m64 = autoperm.perturbed(model, 0)
    for seed in range(3):
        perms = autoperm.random_permutation(spec, seed, derangement=True)
        err = autoperm.check_equivalence(m64, spec, perms, float64_inputs((x,)))
        assert err < 1e-9, f"unsound: {err:.2e}"
    return spec


class AnyEmptyDims(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + self.c(self.op(h > 0, dim=()).to(h.dtype))


@pytest.mark.parametrize("op", [torch.any, torch.all])
def test_any_all_with_empty_dims_is_elementwise(op):
    spec = assert_sound(AnyEmptyDims(op), torch.randn(3, 8))
    assert not any(len(g.axes) == 1 and g.axes[0].tensor == "c.weight" for g in spec.groups)


class AddBmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(2, 5))
        self.w = nn.Parameter(torch.randn(3, 4, 5))

    def forward(self, x):
        return torch.addbmm(self.bias, x.view(3, 2, 4), self.w)


def test_addbmm_bias_is_constrained():
    assert_sound(AddBmm(), torch.randn(6, 4))


class BatchReshapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        z = self.a(x).view(x.shape[0], 2, 3).transpose(0, 1).reshape(-1)
        return z.view(2, -1).sum(-1)


def test_symbolic_strides_differing_by_a_constant():
    assert_sound(BatchReshapes(), torch.randn(3, 6))


def test_legacy_weight_norm_is_copied_and_frozen():
    """The legacy weight_norm hook stores a non-leaf weight on the module: copying must work, and
    the unknown ``_weight_norm`` op freezes what it touches."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 6)), nn.ReLU(), nn.Linear(6, 3))
    spec = autoperm.trace(model, torch.randn(2, 8))
    assert spec.meta["unsupported_ops"] == {"aten._weight_norm.default": 1}
    assert spec.groups == []


class CachesInForward(nn.Module):
    """Like timm's EfficientFormer: eval mode caches a tensor computed from a parameter."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.cache = {}

    def forward(self, x):
        if not self.training:
            self.cache["s"] = self.scale * 2  # a non-leaf tensor stored on the module
        return self.fc2(torch.relu(self.fc1(x)) * self.scale * 2)


def test_model_that_cached_a_non_leaf_tensor_can_be_traced_and_merged():
    model = CachesInForward().eval()
    x = torch.randn(3, 4)
    model(x)
    spec = autoperm.trace(model, x)
    assert len(spec.groups) == 1
    merged = autoperm.merge(model, CachesInForward().eval(), example_inputs=x)
    assert merged(x).shape == (3, 2)
