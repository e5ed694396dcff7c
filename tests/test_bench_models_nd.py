"""The merge benchmark's models (benchmarks/digits_models.py) in their 2-D (digits) and 1-D
(mnist1d) variants: every factory accepts the data's shape, and the 1-D conv nets compile to a
verified spec whose random permutations leave the function unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import autoperm
from helpers import rel_change, single_axis_spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from digits_models import MODELS  # noqa: E402


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)])
@pytest.mark.parametrize("name", ["mlp32", "vgg", "resnet20x1", "mobilenetv2", "vit"])
def test_factory_accepts_shape(name, shape):
    model = MODELS[name][0](shape).eval()
    assert model(torch.randn(3, *shape)).shape == (3, 10)


@pytest.mark.parametrize("name", ["vgg", "resnet20x1", "mobilenetv2"])
def test_1d_conv_nets_permute(name):
    """float64, every parameter and buffer randomized (BatchNorm statistics included): random
    permutations of the spec keep the output; one group's permutation on a single axis of a
    multi-axis group changes it (negative control)."""
    model = autoperm.perturbed(MODELS[name][0]((1, 40)), 0)
    assert any(isinstance(m, torch.nn.Conv1d) for m in model.modules())
    x = torch.randn(4, 1, 40, dtype=torch.float64)
    spec = autoperm.trace(model, x)
    assert spec.groups, "a 1-D conv net has permutable channels"
    perms = autoperm.random_permutation(spec, seed=1, derangement=True)
    assert rel_change(model, spec, perms, (x,)) < 1e-10
    group = max((g for g in spec.groups if len(g.axes) > 1), key=lambda g: g.size)
    axis = next(a for a in group.axes if a.tensor.endswith("weight") and a.dim == 0)
    assert rel_change(model, single_axis_spec(spec, group, axis), {group.name: perms[group.name]}, (x,)) > 1e-3
