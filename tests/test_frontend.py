"""The frontend: clear errors for untraceable models and bad inputs; dynamic batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoperm
from zoo import ZOO


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return -self.fc(x)


def test_data_dependent_control_flow_names_the_line():
    with pytest.raises(autoperm.TraceError, match=r"test_frontend.py:\d+ \(if x.sum\(\) > 0:") as info:
        autoperm.trace(DataDependent(), torch.randn(2, 4))
    assert "torch.cond" in str(info.value)


def test_wrong_example_inputs_wrap_the_models_error():
    factory, _ = ZOO["mlp"]
    with pytest.raises(autoperm.ExampleInputError, match=r"shapes \[\(2, 5\)\].*mat1 and mat2"):
        autoperm.trace(factory(), torch.randn(2, 5))


@pytest.mark.parametrize("bad", [None, [1, 2], (torch.randn(2, 4), 3), ()])
def test_non_tensor_example_inputs_are_rejected(bad):
    with pytest.raises(autoperm.ExampleInputError, match="example_inputs must be a Tensor"):
        autoperm.trace(nn.Linear(4, 2), bad)


def test_non_module_is_rejected():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        autoperm.trace(lambda x: x, torch.randn(2, 4))


def test_batch_of_one_is_exported_with_dynamic_batch():
    factory, inputs = ZOO["vit"]
    model = factory()
    spec = autoperm.trace(model, inputs()[0][:1])
    assert spec.meta["dynamic_batch"] is True
    permuted = autoperm.permute(model, spec, autoperm.random_permutation(spec, 0))
    x = torch.randn(5, 3, 8, 8)
    assert torch.allclose(permuted(x), model(x), atol=1e-5)


def test_multiple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(3, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x, y):
            return self.out(torch.relu(self.a(x) + self.b(y)))

    spec = autoperm.trace(Two(), (torch.randn(2, 3), torch.randn(2, 4)))
    (g,) = spec.groups
    assert {(a.tensor, a.dim) for a in g.axes} == {("a.weight", 0), ("a.bias", 0), ("b.weight", 0),
                                                  ("b.bias", 0), ("out.weight", 1)}
