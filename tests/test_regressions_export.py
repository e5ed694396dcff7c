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


class NotBatch1Branch(Batch1Branch):
    def forward(self, x):
        h = self.a(x)
        if x.shape[0] != 1:  # the mirror image: batch 1 is the plain path
            h = h.flip(1)
        return self.b(h)


def _sound_at(model, spec, batches=(1, 4)):
    for n in batches:
        x = torch.randn(n, 3, 6, 6, dtype=torch.float64)
        for seed in range(3):
            permuted = autoperm.permute(model, spec, autoperm.random_permutation(spec, seed, derangement=True))
            assert torch.allclose(permuted(x), model(x), atol=1e-9), (n, seed)


@pytest.mark.parametrize("cls", [Batch1Branch, NotBatch1Branch])
def test_a_branch_on_the_batch_size_freezes_a_batch_one_trace(cls):
    """A batch of one is exported at batch two: the batch-1 path was never traced. Neither graph's
    spec holds for both batch sizes, so a model that differs between them is frozen."""
    torch.manual_seed(0)
    model = cls().double().eval()
    spec = autoperm.trace(model, torch.randn(1, 3, 6, 6, dtype=torch.float64))
    assert not spec.groups and any("computes differently at batch 1" in f.reason for f in spec.frozen)
    _sound_at(model, spec)
    assert [g.size for g in autoperm.trace(model, torch.randn(2, 3, 6, 6, dtype=torch.float64)).groups] == \
        ([8] if cls is Batch1Branch else [])  # traced at batch 2: the batch >= 2 path, as documented


def test_a_plain_model_traced_at_batch_one_keeps_its_dynamic_batch():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1)).double().eval()
    spec = autoperm.trace(plain, torch.randn(1, 3, 6, 6, dtype=torch.float64))
    assert spec.meta["dynamic_batch"] is True and [g.size for g in spec.groups] == [8]
    _sound_at(plain, spec)


class Normalizer(nn.Module):
    """Updates a running mean of its inputs in forward (a buffer write): batch 1 is not special."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(6))
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 2)

    def forward(self, x):
        self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.b(torch.relu(self.a(x - self.mean)))


def test_a_forward_that_writes_a_buffer_keeps_its_dynamic_batch():
    """Comparing the export with the *first* eager call (before its buffer write) took the write for
    a batch branch, forced a static batch, and later batches of data crashed."""
    spec = autoperm.trace(Normalizer().eval(), torch.randn(1, 6))
    assert spec.meta["dynamic_batch"] is True and [g.size for g in spec.groups] == [16]


class TransposedStateDict(nn.Module):
    """Stores its weight transposed in the state_dict (custom save / load hooks); with
    ``detached_only`` only when ``keep_vars=False`` (what torch.save sees)."""

    def __init__(self, c2: int, detached_only: bool = False):
        super().__init__()
        self.inp, self.W, self.out = nn.Linear(12, 8), nn.Parameter(torch.randn(8, c2)), nn.Linear(c2, 4)
        self.detached_only = detached_only

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not (self.detached_only and keep_vars):
            destination[prefix + "W"] = destination[prefix + "W"].t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict = dict(state_dict)
        state_dict[prefix + "W"] = state_dict[prefix + "W"].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x) @ self.W))


@pytest.mark.parametrize("c2,detached_only", [(8, False), (6, False), (8, True)])
def test_a_state_dict_entry_in_another_layout_is_frozen(c2, detached_only):
    """The spec's dims are the state_dict tensor's: a transposed entry got the graph's groups."""
    torch.manual_seed(0)
    spec = autoperm.trace(TransposedStateDict(c2, detached_only).eval(), torch.randn(2, 5, 12), verify=False)
    assert not spec.groups
    assert {f.dim for f in spec.frozen if f.tensor == "W" and "_save_to_state_dict" in f.reason} == {0, 1}
    plain = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)).eval()  # control: the usual entries
    assert [g.size for g in autoperm.trace(plain, torch.randn(2, 5, 12)).groups] == [8]


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


class Holder:
    """A plain object holding a cache (not a module, dict or list)."""

    def __init__(self):
        self.t = None


class NestedCache(LazyCache):
    def __init__(self):
        super().__init__()
        self.box = Holder()

    def forward(self, x):
        if self.box.t is None:
            self.box.t = self.w.detach()[0].clone()
        return self.out(torch.tanh(self.inp(x) @ self.w) * self.box.t)


class TableCache(LazyCache):
    """Caches a table that does not depend on the weights (a positional-encoding style cache)."""

    def forward(self, x):
        if self.cache is None:
            self.cache = torch.linspace(0.5, 1.5, 6)
        return self.out(torch.tanh(self.inp(x) @ self.w) * self.cache)


@pytest.mark.parametrize("cls", [LazyCache, NestedCache])
def test_a_weight_dependent_cache_kept_across_calls_freezes_the_model(cls):
    """The trace's first call filled the cache, which export lifted as a constant, while the row
    of w it came from stayed free: a never-called permuted copy computed it from permuted w."""
    torch.manual_seed(0)
    fresh = cls().eval()
    spec = autoperm.trace(fresh, torch.randn(2, 12), verify=False)
    assert fresh.cache is None and not spec.groups  # the caller's model was not called
    assert any("caches tensors computed from the weights" in f.reason for f in spec.frozen)


@pytest.mark.parametrize("cls,sizes", [(lambda: LazyCache(keep=False), [6]), (TableCache, [8])],
                         ids=["recomputed", "weight_free"])
def test_tensors_stored_in_forward_that_are_not_stale_caches_keep_their_groups(cls, sizes):
    """Not frozen whole: the row of w read each call freezes w's dim 0; the fixed table, the
    dims it scales."""
    torch.manual_seed(0)
    spec = assert_sound(cls().eval(), torch.randn(2, 12))
    assert [g.size for g in spec.groups] == sizes
    assert not any("caches tensors computed from the weights" in f.reason for f in spec.frozen)


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
