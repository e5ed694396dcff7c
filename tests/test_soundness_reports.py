"""Soundness reports from an adversarial trial: graphs exported at a fixed batch size, sizes
of batch arithmetic the rules cannot prove equal, and F.linear with a broadcast bias. Every
spec is checked in float64 at batch sizes other than the example's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm import frontend


def _max_error(model, spec, batches, features=3, seeds=3):
    m64 = autoperm.perturbed(model, 0)
    errs = []
    for b in batches:
        x = (torch.randn(b, features, dtype=torch.float64),)
        for s in range(seeds):
            perms = autoperm.random_permutation(spec, s, derangement=True)
            errs.append(autoperm.check_equivalence(m64, spec, perms, x))
    return max(errs, default=0.0)


class StarArgs(nn.Module):
    """``forward(*xs)``: the dynamic export fails, the graph is exported at the example's batch."""

    def __init__(self, mix: bool = True):
        super().__init__()
        self.a, self.b, self.mix = nn.Linear(3, 6), nn.Linear(6, 2), mix

    def forward(self, *xs):
        h = self.a(xs[0])
        return self.b(h.T.reshape(xs[0].shape[0], 6) if self.mix else h.relu())


class IntBatch(StarArgs):
    """``int(x.shape[0])``: torch.export specializes the batch without failing."""

    def forward(self, x):
        n = int(x.shape[0])
        return self.b(self.a(x).T.reshape(n, 6))


@pytest.mark.parametrize("cls", [StarArgs, IntBatch])
def test_a_group_that_holds_at_the_example_batch_only_is_frozen(cls, monkeypatch):
    model = cls().eval()
    spec = autoperm.trace(model, torch.randn(3, 3))
    assert spec.meta["dynamic_batch"] is False and spec.meta["static_batch"] == 3
    assert not spec.groups
    assert any("differs at batch 4" in f.reason for f in spec.frozen)
    assert _max_error(model, spec, (3, 4, 6)) < 1e-9
    # control: without the twin at batch 4 the compiler keeps the group, which is wrong at batch 4
    monkeypatch.setattr(frontend, "_attach_twins", lambda *args: None)
    unsound = autoperm.trace(model, torch.randn(3, 3))
    assert unsound.groups   # a factor of the hidden dim, tied through the reshape at batch 3
    assert _max_error(model, unsound, (3,)) < 1e-9
    assert _max_error(model, unsound, (4, 6)) > 1e-3


def test_a_fixed_batch_graph_keeps_the_groups_that_hold_at_other_batch_sizes():
    model = StarArgs(mix=False).eval()
    spec = autoperm.trace(model, torch.randn(3, 3))
    assert spec.meta["static_batch"] == 3 and [g.size for g in spec.groups] == [6]
    assert _max_error(model, spec, (2, 5)) < 1e-9


def test_a_model_that_runs_at_its_example_batch_only_keeps_its_spec(caplog):
    class Only3(StarArgs):
        def forward(self, x):
            if x.shape[0] != 3:
                raise ValueError("batch 3 only")
            return self.b(self.a(x).relu().reshape(int(x.shape[0]), 6))

    with caplog.at_level("WARNING", logger="autoperm.frontend"):
        spec = autoperm.trace(Only3().eval(), torch.randn(3, 3))
    assert spec.meta["dynamic_batch"] is False and spec.meta["batch_checked"] == [3]
    assert [g.size for g in spec.groups] == [6]
    assert "the spec is checked at batch 3 only" in caplog.text


class OddOnly(StarArgs):
    def forward(self, *xs):   # needs an odd batch (a centre example): the twins are at 5 and 11
        x = xs[0]
        if x.shape[0] % 2 == 0:
            raise ValueError("odd batches only")
        return self.b(self.a(x).T.reshape(x.shape[0], 6))


class WithContext(StarArgs):
    def forward(self, *xs):   # a batch input and a context row of leading size 1: only x grows
        x, ctx = xs
        return self.b(self.a(x).T.reshape(x.shape[0], 6) + ctx)


class WithScale(StarArgs):
    def forward(self, *xs):   # a 0-dim second input
        x, scale = xs
        return self.b(self.a(x).T.reshape(x.shape[0], 6)) * scale


@pytest.mark.parametrize("cls, extra, checked", [(OddOnly, (), [3, 5, 11]),
                                                 (WithContext, (torch.randn(1, 1),), [3, 4, 5]),
                                                 (WithScale, (torch.tensor(2.0),), [3, 4, 5])])
def test_twins_grow_the_batch_inputs_only_and_skip_sizes_the_model_refuses(cls, extra, checked, monkeypatch):
    """The reviewer's cases where no twin was built and the batch-3-only group was kept."""
    model = cls().eval()
    spec = autoperm.trace(model, (torch.randn(3, 3), *extra))
    assert spec.meta["batch_checked"] == checked and not spec.groups
    monkeypatch.setattr(frontend, "_attach_twins", lambda *args: None)   # control: the group is kept
    assert autoperm.trace(model, (torch.randn(3, 3), *extra)).groups


class EvenOddHeads(nn.Module):
    """Heads kept apart at even batch sizes, summed (head_dim shared) at odd ones."""

    def __init__(self):
        super().__init__()
        self.v, self.s = nn.Linear(5, 12), nn.Parameter(torch.randn(3, 1))

    def forward(self, x):
        n = int(x.shape[0])
        o = torch.relu(self.v(x)).reshape(n, 3, 4) * self.s
        if n % 2 == 0:
            return (o ** 2).sum((1, 2)).unsqueeze(1)
        return (o.sum(1) ** 2).sum(1).unsqueeze(1)


def test_a_child_group_stays_a_child_only_if_every_twin_agrees(monkeypatch):
    """At batch 2 head_dim may take one permutation per head; at batch 3 the heads are summed,
    so only a shared head_dim permutation holds: the kept group must be a plain one."""
    model = EvenOddHeads().eval()
    spec = autoperm.trace(model, torch.randn(2, 5), hierarchical=True)
    assert sorted(g.size for g in spec.groups) == [3, 4] and all(g.parent is None for g in spec.groups)
    m64 = autoperm.perturbed(model, 0)
    for b in (2, 3, 5):
        for seed in range(2):
            perms = autoperm.random_permutation(spec, seed, derangement=True)
            assert autoperm.check_equivalence(m64, spec, perms, torch.randn(b, 5, dtype=torch.float64)) < 1e-9
    monkeypatch.setattr(frontend, "_attach_twins", lambda *args: None)   # control: a child, wrong at batch 3
    child = autoperm.trace(model, torch.randn(2, 5), hierarchical=True)
    assert any(g.parent for g in child.groups)
    perms = autoperm.random_permutation(child, 0, derangement=True)
    assert autoperm.check_equivalence(m64, child, perms, torch.randn(3, 5, dtype=torch.float64)) > 1e-3


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(3, 6), nn.Linear(12, 2)

    def forward(self, x):  # x: (2N, 3), two halves side by side
        h = self.enc(x).relu()
        a, b = h.split(x.shape[0] // 2, dim=0)
        return self.head(torch.cat([a, b], dim=1))


class FloorView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(3, 6), nn.Linear(4, 4), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(self.c(self.a(x).view(-1, 4)).view(x.shape[0], 6))


@pytest.mark.parametrize("cls", [Siamese, FloorView])
def test_unprovable_batch_arithmetic_freezes_instead_of_raising(cls):
    """Sizes like ``s // 2`` or ``(6 * s) // (3 * s // 2)`` cannot be proven equal to others:
    the node's dims are frozen with the reason (it raised AnalysisError before)."""
    model = cls().eval()
    spec = autoperm.trace(model, torch.randn(6, 3))
    assert any("depend on the batch" in f.reason for f in spec.frozen)
    assert _max_error(model, spec, (6, 8, 10)) < 1e-9


def test_linear_with_a_one_element_bias_broadcasts_it():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 6)
            self.w, self.bias = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(1))
            self.c = nn.Linear(4, 2)

        def forward(self, x):
            return self.c(F.linear(self.a(x), self.w, self.bias).relu())

    model = M().eval()
    spec = autoperm.trace(model, torch.randn(3, 3))
    assert sorted(g.size for g in spec.groups) == [4, 6]   # the broadcast bias does not block the group of 4
    assert _max_error(model, spec, (3, 5)) < 1e-9


def test_an_empty_example_batch_is_refused():
    """A batch of 0 made the verification pass vacuously (error 0.0 for any spec)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(autoperm.ExampleInputError, match="example_inputs= has batch size 0"):
        autoperm.trace(model, torch.randn(0, 4))
    assert autoperm.trace(model, torch.randn(2, 4)).groups   # control: a real batch traces


@pytest.mark.parametrize("dim", [0, 1])
def test_weight_norm_parametrization_gets_a_rule(dim):
    """aten._weight_norm had no rule, so a weight-normed model was frozen whole."""
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(3, 8), dim=dim), nn.ReLU(), weight_norm(nn.Linear(8, 2))).eval()
    spec = autoperm.trace(model, torch.randn(3, 3))
    assert [g.size for g in spec.groups] == [8] and not spec.meta["unsupported_ops"]
    assert _max_error(model, spec, (3, 5)) < 1e-9
    g = spec.groups[0]
    magnitude = [a for a in g.axes if a.tensor == "0.parametrizations.weight.original0"]
    if dim == 1:   # g holds one magnitude per input column: the hidden units leave it alone
        assert not magnitude
        return
    # control: the same group without the first layer's per-unit magnitude g changes the function
    assert magnitude
    g.axes = [a for a in g.axes if a not in magnitude]
    assert _max_error(model, spec, (3,)) > 1e-3


class Pairwise(nn.Module):
    """Two embeddings compared by cosine similarity or pairwise distance (metric learning)."""

    def __init__(self, how):
        super().__init__()
        self.a, self.b, self.c, self.how = nn.Linear(3, 6), nn.Linear(3, 6), nn.Linear(1, 2), how

    def forward(self, x):
        ea, eb = self.a(x), self.b(x)
        if self.how == "cosine":
            s = F.cosine_similarity(ea, eb).unsqueeze(1)
        elif self.how == "cosine_outer":
            s = F.cosine_similarity(ea.unsqueeze(1), eb.unsqueeze(0), dim=-1)[:, :1]
        else:
            s = torch.cdist(ea.unsqueeze(0), eb.unsqueeze(0), p=1 if self.how == "cdist1" else 2)[0][:, :1]
        return self.c(s)


@pytest.mark.parametrize("how", ["cosine", "cosine_outer", "cdist", "cdist1"])
def test_cosine_similarity_and_cdist_tie_the_compared_features(how):
    """They had no rule, so both embeddings were frozen; the compared feature dim is one group."""
    model = Pairwise(how).eval()
    spec = autoperm.trace(model, torch.randn(3, 3))
    assert [g.size for g in spec.groups] == [6] and not spec.meta["unsupported_ops"]
    assert {a.tensor for a in spec.groups[0].axes} == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert _max_error(model, spec, (3, 5)) < 1e-9
    # control: permuting one embedding's features without the other's changes the output
    spec.groups[0].axes = [a for a in spec.groups[0].axes if a.tensor.startswith("a.")]
    assert _max_error(model, spec, (3,)) > 1e-3


class Interleaved(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.a, self.d, self.dim = nn.Linear(3, 6), nn.Linear(12, 4), dim

    def forward(self, x):
        h = self.a(x).relu()
        if self.dim is None:
            return self.d(h.repeat_interleave(2).reshape(x.shape[0], 12))
        return self.d(h.repeat_interleave(2, dim=self.dim).reshape(x.shape[0], 12))


@pytest.mark.parametrize("dim", [1, None])
def test_repeat_interleave_carries_the_units_with_their_copies(dim):
    """repeat_interleave had no rule (everything it touched was frozen): unit u's copies are
    slots 2u and 2u + 1 of the next layer's input."""
    model = Interleaved(dim).eval()
    spec = autoperm.trace(model, torch.randn(3, 3))
    hidden = [g for g in spec.groups if g.size == 6]
    assert len(hidden) == 1 == len(spec.groups) and not spec.meta["unsupported_ops"]   # the copies stay put
    assert any(a.tensor == "d.weight" and a.inner == 2 for a in hidden[0].axes)
    assert _max_error(model, spec, (3, 5)) < 1e-9
    # control: moving d's columns as whole blocks of 6 (the layout of repeat, not repeat_interleave) is wrong
    hidden[0].axes = [dataclasses.replace(a, outer=2, inner=1) if a.tensor == "d.weight" else a
                      for a in hidden[0].axes]
    spec.groups = hidden
    assert _max_error(model, spec, (3,)) > 1e-3


def test_only_arithmetic_on_symbols_is_frozen_a_bare_batch_symbol_against_a_number_is_a_rule_bug():
    """Freezing instead of raising is meant for ``s // 2``-style sizes; a rule that ties the
    batch symbol itself to a feature size is wrong and must still raise (not hide as a freeze)."""
    import sympy

    from autoperm.errors import AnalysisError
    from autoperm.ir import AtomTable, SymbolicSizeError

    s = sympy.Symbol("s77", positive=True, integer=True)
    table = AtomTable()
    with pytest.raises(AnalysisError) as bug:
        table.tie(table.new(s), table.new(6))
    assert not isinstance(bug.value, SymbolicSizeError)
    with pytest.raises(SymbolicSizeError):
        table.tie(table.new(s - s // 2), table.new(s // 2))
    table.tie(table.new(s), table.new(s))   # control: equal sizes tie


# --------------------------------------------------------------------------- partial merging (round 2)
class SharedBias(nn.Module):
    def __init__(self, shared=True):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 6))
        self.b1 = nn.Parameter(torch.randn(1 if shared else 8))
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(F.relu(F.linear(x, self.w1, self.b1)))


class SharedScale(nn.Module):
    def __init__(self, shared=True):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.s = nn.Parameter(torch.tensor(1.5) if shared else torch.rand(8) + 0.5)

    def forward(self, x):
        return self.l2(F.relu(self.l1(x)) * self.s)


def _pair(cls, *args):
    torch.manual_seed(0)
    return autoperm.perturbed(cls(*args), 0), autoperm.perturbed(cls(*args), 1), torch.randn(4, 6, dtype=torch.float64)


@pytest.mark.parametrize("cls", [SharedBias, SharedScale])
def test_partial_merging_reports_a_parameter_shared_by_all_units(cls):
    """Widened, A's and B's own units share the interpolated value of a one-element bias or a
    0-dim scale, so partial=1 is not the ensemble: the gap must be reported, not claimed exact."""
    from autoperm.rewrite.partial import partial_widen

    for shared in (True, False):
        a, b, x = _pair(cls, shared)
        al = autoperm.match(a, b, example_inputs=x)
        r = partial_widen(a, b, al, alpha=0.3, partial=1.0, example_inputs=x)
        with torch.no_grad():
            ens = 0.7 * a(x) + 0.3 * b(x)
            gap = float((r.module(x) - ens).norm() / ens.norm())
        if shared:
            assert not r.exact_limits and any("shared by all units" in w for ws in r.nonlocal_ops.values() for w in ws)
            assert gap > 1e-3
        else:   # control: one value per unit widens exactly
            assert r.exact_limits and not r.nonlocal_ops and gap < 1e-9


def test_partial_merging_does_not_widen_units_compared_by_cosine_similarity():
    from autoperm.rewrite.partial import partial_widen

    class Cos(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 3)

        def forward(self, x):
            return self.o(x) * F.cosine_similarity(F.relu(self.a(x)), F.relu(self.b(x)), dim=-1)[:, None]

    a, b, x = _pair(Cos)
    al = autoperm.match(a, b, example_inputs=x)
    r = partial_widen(a, b, al, alpha=0.3, partial=1.0, example_inputs=x)   # raised its self-check before
    assert any("cosine_similarity" in why for why in r.frozen.values())
    full = autoperm.merge(a, b, alpha=0.3, alignment=al, example_inputs=x)
    with torch.no_grad():   # nothing widened: the full merge
        assert float((r.module(x) - full(x)).norm() / full(x).norm()) < 1e-9


def test_a_partial_merge_of_a_fixed_batch_graph_runs_at_other_batch_sizes():
    """int(x.shape[0]) fixes the export's batch; the widened module kept the literal 4."""
    class IntShape(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.o = nn.Linear(6, 16), nn.Linear(4, 5), nn.Linear(20, 3)

        def forward(self, x):
            n = int(x.shape[0])
            return self.o(F.relu(self.l2(F.relu(self.l1(x)).reshape(n, 4, 4))).reshape(n, -1))

    a, b, x = _pair(IntShape)
    al = autoperm.match(a, b, example_inputs=x)
    full = autoperm.merge(a, b, alpha=0.3, alignment=al, example_inputs=x)
    zero = autoperm.merge(a, b, alpha=0.3, partial=0.0, alignment=al, example_inputs=x)
    half = autoperm.merge(a, b, alpha=0.3, partial=0.5, alignment=al, example_inputs=x)
    x7 = torch.randn(7, 6, dtype=torch.float64)
    with torch.no_grad():
        assert half(x7).shape == (7, 3)
        assert float((zero(x7) - full(x7)).norm() / full(x7).norm()) < 1e-9


class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.l1, self.l2, self.l3 = weight_norm(nn.Linear(6, 8)), weight_norm(nn.Linear(8, 8)), nn.Linear(8, 3)

    def forward(self, x):
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


def test_weight_normed_layers_count_as_layers_for_pfm_and_bias_removal():
    """Their weight is computed (g * v / |v|), not a state_dict tensor: PFM counted only l3, so
    preserve_first=1 preserved everything, and bias removal skipped l1.bias."""
    from autoperm.frontend import capture
    from autoperm.rewrite.pfm import counted_layers

    a, b, x = _pair(WeightNormed)
    assert len(counted_layers(capture(a, x))) == 3
    al = autoperm.match(a, b, example_inputs=x)
    with torch.no_grad():
        ens = 0.7 * a(x) + 0.3 * b(x)
        one = autoperm.merge(a, b, alpha=0.3, alignment=al, example_inputs=x, preserve_first=1)
        every = autoperm.merge(a, b, alpha=0.3, alignment=al, example_inputs=x, preserve_first=3)
        assert float((every(x) - ens).norm() / ens.norm()) < 1e-9
        assert float((one(x) - ens).norm() / ens.norm()) > 1e-3   # l1 only: not the ensemble
        x7 = torch.randn(7, 6, dtype=torch.float64)
        assert float((every(x7) - (0.7 * a(x7) + 0.3 * b(x7))).norm()) < 1e-9 * float(a(x7).norm())
    removed = autoperm.merge(a, b, alpha=0.3, alignment=al, example_inputs=x, normalize="bias_removal")
    assert all(bool((removed.state_dict()[f"l{i}.bias"] == 0).all()) for i in (1, 2, 3))


def test_insert_perm_layers_finds_a_skip_over_a_weight_normed_conv():
    from torch.nn.utils.parametrizations import weight_norm

    class ResConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.i, self.f = nn.Conv2d(3, 4, 3, padding=1), weight_norm(nn.Conv2d(4, 4, 3, padding=1))
            self.o = nn.Linear(4, 2)

        def forward(self, x):
            h = self.i(x)
            h = h + self.f(F.relu(h))
            return self.o(h.mean((2, 3)))

    model = ResConv().eval()
    x = torch.randn(2, 3, 6, 6)
    new, spec = autoperm.insert_perm_layers(model, x)   # raised "no identity skip connection" before
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), atol=1e-6)
    assert any(k.startswith("skip_perms") for k in new.state_dict())
