"""Regressions from the second new-user trial: RESET and example inputs on emitted modules
(`insert_perm_layers`, partial merging), the class check of two emitted modules, non-finite
activation data, and type errors that name the argument."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm.merge.normalize import graph_batchnorms, has_batchnorm, reset_batchnorm

STATS = ("bn.running_mean", "bn.running_var", "b1.running_mean", "b1.running_var")


class Net(nn.Module):
    """An identity skip tying two convs into one group: `insert_perm_layers` gives it a layer."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.b1(self.c1(x)))
        return self.head(x.mean((2, 3)))


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():
        for bn in (m.bn, m.b1):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return m.eval()


def _data(seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 6, 6, generator=g) for _ in range(3)]


def test_reset_of_an_emitted_module_equals_reset_of_the_original():
    """RESET left the BatchNorm statistics of emitted GraphModules (aten nodes, no nn.BatchNorm)
    untouched, silently."""
    a = _net(0)
    a2, _ = autoperm.insert_perm_layers(a, torch.randn(2, 1, 6, 6))
    assert has_batchnorm(a2) and len(graph_batchnorms(a2)) == 2 and graph_batchnorms(a) == []
    ref = reset_batchnorm(copy.deepcopy(a), _data()).state_dict()
    got = reset_batchnorm(copy.deepcopy(a2), _data()).state_dict()
    for k in STATS:
        assert torch.allclose(got[k], ref[k], atol=1e-5), k
        assert not torch.allclose(got[k], a.state_dict()[k], atol=1e-3), k  # they did change
    assert torch.equal(a2.state_dict()["bn.running_var"], a.state_dict()["bn.running_var"])  # a2 untouched


def test_merging_emitted_modules_resets_infers_inputs_and_does_not_warn_of_classes(caplog):
    a2, _ = autoperm.insert_perm_layers(_net(0), torch.randn(2, 1, 6, 6))
    b2, _ = autoperm.insert_perm_layers(_net(1), torch.randn(2, 1, 6, 6))
    assert type(a2) is not type(b2)  # each emitted module has a class of its own
    with caplog.at_level(logging.WARNING, logger="autoperm"):
        plain = autoperm.merge(a2, b2)  # example inputs from the graph's placeholders
    assert "their tensors are aligned and merged as if" not in caplog.text
    al = autoperm.match(a2, b2)
    reset = autoperm.merge(a2, b2, alignment=al, normalize="reset", data=_data())
    expected = reset_batchnorm(autoperm.merge(a2, b2, alignment=al), _data()).state_dict()
    got, before = reset.state_dict(), plain.state_dict()
    for k in STATS:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
        assert not torch.allclose(got[k], before[k], atol=1e-3), k


class NoSkip(Net):
    def forward(self, x):  # the same tensors as Net, another function
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(torch.relu(self.b1(self.c1(x))).mean((2, 3)))


def test_graph_modules_count_as_one_class_only_when_their_code_agrees(caplog):
    x = torch.randn(2, 1, 6, 6)
    same = torch.fx.symbolic_trace(_net(0)), torch.fx.symbolic_trace(_net(1))
    assert type(same[0]) is not type(same[1])
    with caplog.at_level(logging.WARNING, logger="autoperm"):
        autoperm.merge(*same, method="identity", example_inputs=x)
    assert "their tensors are aligned and merged as if" not in caplog.text
    torch.manual_seed(1)
    other = torch.fx.symbolic_trace(NoSkip().eval())
    with caplog.at_level(logging.WARNING, logger="autoperm"):
        autoperm.merge(same[0], other, method="identity", example_inputs=x)
    assert "their tensors are aligned and merged as if" in caplog.text


def test_activation_matching_refuses_non_finite_data():
    """A NaN in data= made activation matching return identity permutations without a word."""
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2))
    x = torch.randn(64, 6)
    assert not all(torch.equal(p, torch.arange(16)) for p in autoperm.align(a, b, method="activation",
                                                                             data=[x]).values())  # control
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite inputs"):
        autoperm.align(a, b, method="activation", data=[x])


def test_state_dicts_instead_of_models_are_named():
    a, b = _net(0), _net(1)
    with pytest.raises(TypeError, match=r"model_a must be a torch.nn.Module, got OrderedDict \(a state_dict\?\)"):
        autoperm.merge(a.state_dict(), b.state_dict())
    with pytest.raises(TypeError, match=r"models\[1\] must be a torch.nn.Module, got list"):
        autoperm.merge_many([a, [1, 2]])


def test_loss_fn_that_cannot_read_dict_outputs_is_named():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return {"logits": self.fc2(torch.relu(self.fc1(x)))}

    torch.manual_seed(0)
    a, b = DictOut(), DictOut()
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
    with pytest.raises(TypeError, match=r"loss_fn\(outputs, target\) failed on the model's outputs, a dict"):
        autoperm.merge(a, b, method="ste", data=data, loss_fn=F.cross_entropy, steps=1)
    merged = autoperm.merge(a, b, method="ste", data=data, steps=1,  # control: a loss_fn that reads the dict
                            loss_fn=lambda out, y: F.cross_entropy(out["logits"], y))
    assert torch.isfinite(merged(data[0][0])["logits"]).all()


class Outer(nn.Module):
    """An emitted module used as a submodule, beside an nn.BatchNorm."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone, self.norm, self.fc = backbone, nn.BatchNorm1d(3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.norm(self.backbone(x)))


def test_reset_reaches_emitted_modules_inside_a_model():
    a = _net(0)
    inner, _ = autoperm.insert_perm_layers(a, torch.randn(2, 1, 6, 6))
    torch.manual_seed(3)
    plain, wrapped = Outer(copy.deepcopy(a)).eval(), Outer(inner).eval()
    wrapped.load_state_dict(plain.state_dict(), strict=False)  # the same outer head
    assert has_batchnorm(Outer(inner)) and has_batchnorm(nn.Sequential(inner))
    ref = reset_batchnorm(copy.deepcopy(plain), _data()).state_dict()
    got = reset_batchnorm(copy.deepcopy(wrapped), _data()).state_dict()
    for k in [f"backbone.{s}" for s in STATS] + ["norm.running_mean", "norm.running_var"]:
        assert torch.allclose(got[k], ref[k], atol=1e-5), k


class SharedBN(nn.Module):
    """One BatchNorm applied twice: RESET averages over both calls."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn, self.fc = nn.Linear(4, 6), nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.bn(self.drop(self.a(x)))
        return self.fc(self.bn(self.b(torch.relu(h))))


def test_graph_reset_of_a_batchnorm_used_twice_and_dropout_match_the_module_reset():
    torch.manual_seed(0)
    m = SharedBN().eval()
    emitted = torch.export.export(m, (torch.randn(32, 4),)).run_decompositions({}).module()  # a GraphModule
    assert len(graph_batchnorms(emitted)) == 2  # two nodes, one pair of buffers
    data = [torch.randn(32, 4) for _ in range(3)]
    ref = reset_batchnorm(copy.deepcopy(m), data).state_dict()
    got = reset_batchnorm(copy.deepcopy(emitted), data).state_dict()
    for k in ("bn.running_mean", "bn.running_var"):
        assert torch.allclose(got[k], ref[k], atol=1e-5), k
    # dropout stays off while statistics are measured: the module path equals a dropout-free model
    nodrop = copy.deepcopy(m)
    nodrop.drop = nn.Identity()
    assert torch.allclose(reset_batchnorm(nodrop, data).state_dict()["bn.running_var"], ref["bn.running_var"])


def test_reset_accepts_a_batch_of_one_image():
    m = _net(0)
    one = [torch.randn(1, 1, 6, 6) for _ in range(2)]
    out = reset_batchnorm(copy.deepcopy(m), one).state_dict()
    assert not torch.allclose(out["bn.running_var"], m.state_dict()["bn.running_var"])
    with pytest.raises(ValueError, match="more than one value per channel"):
        reset_batchnorm(SharedBN().eval(), [torch.randn(1, 4)])
