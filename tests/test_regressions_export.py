"""Cases found by adversarial review of the frontend: each was unsound (with verify=False)
before its fix. What torch.export records must be the model the user has."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoperm
from test_regressions import assert_sound


class Batch1Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        h = self.a(x)
        if x.shape[0] == 1:  # seen at batch 1 only, and a batch of 1 used to be exported at batch 2
            h = h.flip(1)
        return self.b(h)


def test_a_branch_on_a_batch_of_one_is_traced_at_batch_one():
    torch.manual_seed(0)
    spec = assert_sound(Batch1Branch().eval(), torch.randn(1, 3, 6, 6))
    assert spec.meta["dynamic_batch"] is False and not spec.groups  # flip fixes the channel order
    # control: a plain model traced at batch 1 keeps its dynamic batch and its group
    plain = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()
    spec = assert_sound(plain, torch.randn(1, 3, 6, 6))
    assert spec.meta["dynamic_batch"] is True and [g.size for g in spec.groups] == [8]


class TransposedStateDict(nn.Module):
    """Stores its weight transposed in the state_dict (custom save / load hooks)."""

    def __init__(self, c2: int):
        super().__init__()
        self.inp, self.W, self.out = nn.Linear(12, 8), nn.Parameter(torch.randn(8, c2)), nn.Linear(c2, 4)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "W"] = destination[prefix + "W"].t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict = dict(state_dict)
        state_dict[prefix + "W"] = state_dict[prefix + "W"].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x) @ self.W))


@pytest.mark.parametrize("c2", [8, 6])
def test_a_state_dict_entry_in_another_layout_is_frozen(c2):
    """The spec's dims are the state_dict tensor's: a transposed entry got the graph's groups."""
    torch.manual_seed(0)
    spec = assert_sound(TransposedStateDict(c2).eval(), torch.randn(2, 5, 12))
    assert not spec.groups
    assert {f.dim for f in spec.frozen if f.tensor == "W" and "_save_to_state_dict" in f.reason} == {0, 1}


class LazyCache(nn.Module):
    """Fills a cache from a weight on its first call and keeps it (never cleared)."""

    def __init__(self, keep: bool = True):
        super().__init__()
        self.inp, self.w, self.out = nn.Linear(12, 8), nn.Parameter(torch.randn(8, 6)), nn.Linear(6, 4)
        self.keep, self.cache = keep, None

    def forward(self, x):
        if self.cache is None or not self.keep:  # keep=False: recomputed each call (a stored activation)
            self.cache = self.w.detach()[0].clone()
        return self.out(torch.tanh(self.inp(x) @ self.w) * self.cache)


def test_a_cache_kept_across_calls_freezes_the_model():
    """The trace's first call filled the cache, which export lifted as a constant, while the row
    of w it came from stayed free: a never-called permuted copy computed it from permuted w."""
    x = torch.randn(2, 12)
    torch.manual_seed(0)
    fresh = LazyCache().eval()
    spec = autoperm.trace(fresh, x, verify=False)
    assert fresh.cache is None and not spec.groups  # the caller's model was not called
    assert any("caches tensors computed from the weights in cache" in f.reason for f in spec.frozen)
    for seed in range(3):  # the never-called model and a copy of it permuted: the same function
        permuted = autoperm.permute(fresh, spec, autoperm.random_permutation(spec, seed))
        assert torch.allclose(permuted(x), _fresh_copy_output(fresh, x), atol=1e-6)
    torch.manual_seed(0)
    spec = assert_sound(LazyCache(keep=False).eval(), x)  # control: recomputed each call, not frozen
    assert [g.size for g in spec.groups] == [6]


def _fresh_copy_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    return copy.deepcopy(model)(x)


class BatchGroupedConv(nn.Module):
    """A per-sample dynamic convolution: its group count is the batch size."""

    def __init__(self):
        super().__init__()
        self.a, self.gen, self.b = nn.Conv2d(3, 8, 1), nn.Linear(8, 64), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        h = self.a(x)
        n, c, hh, ww = h.shape
        w = self.gen(h.mean((2, 3))).view(n * c, c, 1, 1)
        return self.b(torch.nn.functional.conv2d(h.reshape(1, n * c, hh, ww), w, groups=n).view(n, c, hh, ww))


def test_a_convolution_with_a_run_time_group_count_is_frozen():
    """The conv rule crashed (int() of an fx Node) on a group count computed from the batch."""
    torch.manual_seed(0)
    spec = assert_sound(BatchGroupedConv().eval(), torch.randn(2, 3, 6, 6))
    assert any("group count computed at run time" in f.reason for f in spec.frozen)
