"""Regressions from the third new-user trial: Preserve-First and partial merging of a two-input
model given only ``data=``, and partial merging with an alignment traced at another input size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoperm
from autoperm.rewrite.partial import benefit_order
from autoperm.verify import output_error


class TwoIn(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(8, 12), nn.Linear(5, 12)
        self.h, self.o = nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x, y):
        return self.o(torch.relu(self.h(torch.relu(self.a(x) + self.b(y)))))


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()


@pytest.mark.parametrize("kw", [dict(preserve_first=2), dict(preserve_first=2, normalize="repair"),
                                dict(partial=0.3), dict(partial=0.3, normalize="repair")])
def test_rewrites_of_a_two_input_model_read_every_input_of_a_batch(kw):
    """PFM raised 'forward() missing y' and partial merging a bare StopIteration: both read one
    tensor per batch of data=. Oracle: the same merge given example_inputs explicitly."""
    a, b = TwoIn(1).double(), TwoIn(2).double()
    x = (torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64))
    al = autoperm.match(a, b, example_inputs=(x[0][:2], x[1][:2]))
    got = autoperm.merge(a, b, alignment=al, data=[x], **kw)
    ref = autoperm.merge(a, b, alignment=al, data=[x], example_inputs=x, **kw)
    assert output_error(ref(*x), got(*x)) < 1e-9
    plain = autoperm.merge(a, b, alignment=al)
    assert output_error(plain(*x), got(*x)) > 1e-4, "negative control: the rewrite is not the plain merge"
    if "partial" not in kw:  # a spec traced on two inputs tells merge how many each batch holds
        spec = autoperm.trace(a, x)
        m = autoperm.merge(a, b, spec=spec, data=[x], **kw)
        assert m(*x).shape == (16, 3)


def test_two_input_benefit_order_reads_every_input():
    a, b = TwoIn(1).double(), TwoIn(2).double()
    x = (torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64))
    al = autoperm.match(a, b, example_inputs=x)
    ens = (a(*x) + b(*x)) / 2
    with torch.no_grad():
        chosen = benefit_order(a, b, al, [x], lambda m: -float((m(*x) - ens).abs().mean()), budget=0.5)
    assert chosen and all(0 < g <= 1 for g in chosen.values())


def test_partial_merge_retraces_when_the_alignment_saw_another_input_size():
    """A data-free alignment traces at a guessed 32x32 input; partial merging with 6x6 data= then
    failed in a view of the 32x32 graph ('partial merge failed on a graph it cannot widen').
    Oracle: an alignment traced at 6x6 has the same (weight-matching) permutations and gives the
    same partial merge."""
    a, b = cnn(1), cnn(2)
    data = [torch.randn(16, 3, 6, 6, dtype=torch.float64)]
    guessed = autoperm.match(a, b)
    at6 = autoperm.match(a, b, example_inputs=data[0])
    assert all(torch.equal(guessed.perms[g], at6.perms[g]) for g in at6.perms)
    got = autoperm.merge(a, b, alignment=guessed, partial=0.5, data=data)
    ref = autoperm.merge(a, b, alignment=at6, partial=0.5, data=data)
    x = data[0]
    assert output_error(ref(x), got(x)) < 1e-12
    assert output_error(autoperm.merge(a, b, alignment=at6)(x), got(x)) > 1e-4, "negative control: widened"
    with torch.no_grad():
        chosen = benefit_order(a, b, guessed, data, lambda m: -float((m(x) - (a(x) + b(x)) / 2).abs().mean()),
                               budget=0.5)
    assert chosen


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def test_numpy_numbers_are_accepted_like_python_ones():
    """preserve_first=np.int64(2), bias_layers=np.int64(1) and partial=np.float32(0.3) were refused
    (np.float64 was accepted). Oracle: the same merge with the Python number."""
    np = pytest.importorskip("numpy")
    a, b, x = _mlp(1), _mlp(2), torch.randn(8, 5)
    for kw, ref in ((dict(preserve_first=np.int64(2)), dict(preserve_first=2)),
                    (dict(preserve_first=2, normalize="bias_removal", bias_layers=np.int64(1)),
                     dict(preserve_first=2, normalize="bias_removal", bias_layers=1)),
                    (dict(normalize="bias_removal", bias_layers=np.int32(1)), dict(normalize="bias_removal", bias_layers=1)),
                    (dict(partial=np.float32(0.5)), dict(partial=0.5))):
        got, want = autoperm.merge(a, b, example_inputs=x, **kw), autoperm.merge(a, b, example_inputs=x, **ref)
        assert torch.equal(got(x), want(x)), kw


def test_rewrite_argument_errors_name_the_argument():
    a, b, x = _mlp(1), _mlp(2), torch.randn(8, 5)
    with pytest.raises(ValueError, match="preserve_first must be a non-negative int.*'x'"):
        autoperm.merge(a, b, example_inputs=x, preserve_first="x", partial=0.3)
    with pytest.raises(ValueError, match=r"alpha=1.5 with partial=.*\[0, 1\]"):
        autoperm.merge(a, b, example_inputs=x, alpha=1.5, partial=0.3)
    assert autoperm.merge(a, b, example_inputs=x, alpha=1.5, preserve_first=1)(x).shape == (8, 3), \
        "PFM extrapolates like the plain merge"
    al = autoperm.match(a, b, example_inputs=x)
    with pytest.raises(ValueError, match="data=None"):
        benefit_order(a, b, al, None, lambda m: 1.0)
    with pytest.raises(ValueError, match="evaluate returned 'high'"):
        benefit_order(a, b, al, [x], lambda m: "high")


class Scaled(nn.Module):
    """A second, 0-dim input: export cannot make the batch dynamic, so the graph keeps batch 4."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x, t):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1)))))) * t


@pytest.mark.parametrize("kw", [dict(preserve_first=2), dict(partial=0.5)])
def test_rewrites_retrace_a_graph_with_a_fixed_batch(kw):
    """The alignment's graph had batch 4 baked in; data of batch 8 was run through it
    ("shape '[4, 8]' is invalid"). Oracle: the same merge given inputs of batch 8 to match."""
    a, b = Scaled(1).double(), Scaled(2).double()
    t = torch.tensor(2.0, dtype=torch.float64)
    al = autoperm.match(a, b, example_inputs=(torch.randn(4, 2, 4, dtype=torch.float64), t))
    assert not al.traced.dynamic_batch
    x = torch.randn(8, 2, 4, dtype=torch.float64)
    got = autoperm.merge(a, b, alignment=al, data=[(x, t)], **kw)
    assert got(x, t).shape == (8, 3)
    al8 = autoperm.match(a, b, example_inputs=(x, t))
    ref = autoperm.merge(a, b, alignment=al8, data=[(x, t)], **kw)
    assert all(torch.equal(al.perms[g], al8.perms[g]) for g in al8.perms)
    assert output_error(ref(x, t), got(x, t)) < 1e-12
