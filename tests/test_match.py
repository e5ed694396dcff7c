"""Alignment and merging: recovery of planted permutations, limits, errors, untouched inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoperm
from helpers import state_snapshot
from zoo import ZOO

_CACHE = {}


def planted(name, seed=3):
    if name not in _CACHE:
        factory, inputs = ZOO[name]
        a = autoperm.perturbed(factory(), 0)
        spec = autoperm.trace(a, tuple(t.double() if t.is_floating_point() else t for t in inputs()), verify=False)
        _CACHE[name] = (a, spec)
    a, spec = _CACHE[name]
    p = autoperm.random_permutation(spec, seed, derangement=True)
    return a, spec, p, autoperm.permute(a, spec, p)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_weight_matching_undoes_a_planted_permutation(name):
    a, spec, p, b = planted(name)
    al = autoperm.match(a, b, spec, method="weight")
    inv = autoperm.invert(p)
    wrong = [g for g in inv if not torch.equal(al.perms[g], inv[g])]
    assert not wrong, f"{name}: groups not recovered: {wrong}"
    assert al.history == sorted(al.history), "the objective never decreases"


def random_batches(name, n=3):
    x0 = ZOO[name][1]()[0]
    if x0.is_floating_point():
        return [torch.randn(x0.shape, dtype=torch.float64) for _ in range(n)]
    return [torch.randint(0, int(x0.max()) + 1, x0.shape) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_activation_matching_undoes_a_planted_permutation(name):
    a, spec, p, b = planted(name)
    al = autoperm.match(a, b, method="activation", data=random_batches(name))
    inv = autoperm.invert(p)
    wrong = [g for g in inv if not torch.equal(al.perms[g], inv[g])]
    assert not wrong, f"{name}: groups not recovered: {wrong}"
    assert al.history[0] > 0.999, "matched units are perfectly correlated"


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vit", "densenet"])
def test_merge_with_permuted_self_is_self(name):
    a, spec, _, b = planted(name)
    merged = autoperm.merge(a, b, spec=spec)
    assert type(merged) is type(a)
    sa, sm = a.state_dict(), merged.state_dict()
    assert max((sa[k] - sm[k]).abs().max().item() for k in sa if sa[k].is_floating_point()) < 1e-12


def test_alpha_limits():
    a, spec, _, _ = planted("resnet20")
    factory, inputs = ZOO["resnet20"]
    torch.manual_seed(123)  # b from another init than a (planted() may have built a at seed 0 earlier)
    b = autoperm.perturbed(factory(), 7)
    x = inputs()[0].double()
    m0 = autoperm.merge(a, b, spec=spec, alpha=0.0)
    assert torch.allclose(m0(x), a(x), atol=1e-12)
    m1 = autoperm.merge(a, b, spec=spec, alpha=1.0)
    assert torch.allclose(m1(x), b(x), atol=1e-10), "alpha=1 is the aligned model_b: same function as b"
    naive = autoperm.merge(a, b, spec=spec, method="identity")
    mid = autoperm.merge(a, b, spec=spec)
    assert not torch.allclose(naive(x), mid(x)), "alignment changes the merge"


def test_matching_is_deterministic_under_seed():
    a, spec, _, _ = planted("vgg")
    factory, _ = ZOO["vgg"]
    b = autoperm.perturbed(factory(), 5)
    p1 = autoperm.align(a, b, spec, seed=1)
    p2 = autoperm.align(a, b, spec, seed=1)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_inputs_are_not_modified():
    factory, inputs = ZOO["resnet20"]
    a, b = factory().train(), factory().eval()
    before_a, before_b = state_snapshot(a), state_snapshot(b)
    autoperm.merge(a, b, example_inputs=inputs(), normalize="reset", data=[inputs()[0]] * 2)
    assert all(torch.equal(before_a[k], a.state_dict()[k]) for k in before_a)
    assert all(torch.equal(before_b[k], b.state_dict()[k]) for k in before_b)
    assert a.training and not b.training


def test_reset_recomputes_batchnorm_statistics():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    b = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    data = [torch.randn(16, 3) for _ in range(3)]
    merged = autoperm.merge(a, b, normalize="reset", data=data)
    with torch.no_grad():
        h = merged[0](torch.cat(data))
    assert torch.allclose(merged[1].running_mean, h.mean(0), atol=1e-5)
    assert not merged.training


def test_example_inputs_are_inferred():
    a = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    merged = autoperm.merge(a, b)
    assert merged(torch.randn(3, 5)).shape == (3, 2)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(method="nope"), ValueError, "method='nope' is not available"),
    (dict(normalize="repairx"), ValueError, "normalize='repairx' is not available"),
    (dict(normalize="reset"), ValueError, "needs data="),
    (dict(method="activation"), ValueError, "method='activation' needs data="),
    (dict(alpha=float("nan")), ValueError, "alpha must be a finite number"),
])
def test_bad_arguments(kwargs, error, message):
    a = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    with pytest.raises(error, match=message):
        autoperm.merge(a, b, **kwargs)


def test_different_architectures_name_the_tensor():
    a = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    with pytest.raises(autoperm.SpecError, match=r"'0.weight' has shape \[6, 5\] in model_a and \[7, 5\]"):
        autoperm.merge(a, b)
    with pytest.raises(autoperm.SpecError, match="float32 on cpu in model_a but torch.float64"):
        autoperm.merge(a, nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double())


def test_non_finite_weights_are_rejected():
    a = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        b[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="model_b has non-finite values in '0.weight'"):
        autoperm.merge(a, b)


def test_weight_matching_starts_option():
    """starts=2 (default) keeps the better of two starts, so it never scores below starts=1."""
    from autoperm.match.weight import weight_matching

    factory, _ = ZOO["vgg"]
    torch.manual_seed(11)
    a, b = factory(), factory()
    spec = planted("vgg")[1]
    _, h1 = weight_matching(spec, a.state_dict(), b.state_dict(), starts=1)
    _, h2 = weight_matching(spec, a.state_dict(), b.state_dict(), starts=2)
    assert max(h2) >= max(h1) - 1e-9 and max(h1) > 0
    with pytest.raises(ValueError, match="starts=3"):
        weight_matching(spec, a.state_dict(), b.state_dict(), starts=3)


def test_weight_matching_gains_read_off_the_cost_match_exact_gains(monkeypatch):
    """Large gains are read off the cost matrices instead of a pass over the moved slots; the
    descent must take exactly the steps it takes with every gain computed exactly, and its
    final objective must be the exact ``<A, P(B)>``."""
    from autoperm.match import descent as descent_module
    from autoperm.match import weight as weight_module
    from autoperm.permute import permute_state_dict

    factory, _ = ZOO["resnet20"]
    torch.manual_seed(5)
    a, b = factory(), factory()
    spec = planted("resnet20")[1]
    sa, sb = a.state_dict(), b.state_dict()
    fast, h_fast = weight_module.weight_matching(spec, sa, sb, starts=1)
    assert weight_module.last_profile.get("trusted", 0) > 0
    monkeypatch.setattr(descent_module, "_TRUST", float("inf"))  # every gain computed exactly
    exact, h_exact = weight_module.weight_matching(spec, sa, sb, starts=1)
    assert all(torch.equal(fast[k], exact[k]) for k in exact)
    assert len(h_fast) == len(h_exact) > 1
    pb = permute_state_dict(sb, spec, fast)
    tensors = {ax.tensor for g in spec.groups for ax in g.axes}
    value = sum(float(torch.dot(sa[t].reshape(-1).double(), pb[t].reshape(-1).double())) for t in tensors)
    assert h_fast[-1] == pytest.approx(value, rel=1e-12)
    assert not any(torch.equal(fast[g.name], torch.arange(g.size)) for g in spec.groups if g.size > 4)


def test_weight_matching_tol_and_max_iter_stop_early():
    factory, _ = ZOO["resnet20"]
    torch.manual_seed(6)
    a, b = factory(), factory()
    spec = planted("resnet20")[1]
    full = autoperm.match(a, b, spec, starts=1)
    one = autoperm.match(a, b, spec, starts=1, max_iter=1)
    loose = autoperm.match(a, b, spec, starts=1, tol=0.5)
    assert len(one.history) == 1 and len(loose.history) == 2 < len(full.history)
    assert one.history[0] <= loose.history[-1] <= full.history[-1]
    start = autoperm.match(a, b, spec, method="identity")
    assert start.history == [] and one.history[0] > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="identity", tol=0.1), "tol= is used only by method='weight'"),
    (dict(method="identity", starts=1), "starts= is used only by method='weight'"),
    (dict(starts=3), "starts=3: pass 1"),
    (dict(tol=1.5), r"tol=1.5: pass a number in \[0, 1\)"),
    (dict(max_iter=0), "max_iter=0: pass a positive number"),
])
def test_weight_matching_options_are_checked(kwargs, message):
    a = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=message):
        autoperm.match(a, b, **kwargs)


def test_weight_matching_picks_its_starts_by_size(monkeypatch):
    """``starts=None`` runs the greedy second start on small models only (cost-matrix work up to
    ``_AUTO_TWO_STARTS``); on larger ones one start, the fast option."""
    from autoperm.match import weight as weight_module

    factory, _ = ZOO["resnet20"]
    torch.manual_seed(7)
    a, b = factory(), factory()
    spec = planted("resnet20")[1]
    _, h_auto = weight_module.weight_matching(spec, a.state_dict(), b.state_dict())
    assert weight_module.last_profile["starts"] == 2
    _, h_two = weight_module.weight_matching(spec, a.state_dict(), b.state_dict(), starts=2)
    assert h_auto == h_two
    monkeypatch.setattr(weight_module, "_AUTO_TWO_STARTS", 0)
    _, h_big = weight_module.weight_matching(spec, a.state_dict(), b.state_dict())
    assert weight_module.last_profile["starts"] == 1
    _, h_one = weight_module.weight_matching(spec, a.state_dict(), b.state_dict(), starts=1)
    assert h_big == h_one


def test_same_rows_order_finds_a_permutation_of_rows_and_refuses_anything_else():
    """The invariant start's shortcut: B's unit rows are A's in another order -> that order
    (checked against the planted one); a changed row, rows of another shape or a NaN -> None,
    so that the assignment is solved instead."""
    from autoperm.match.descent import same_rows_order

    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(40, 7, generator=g), torch.randn(40, 1, generator=g)
    p = torch.randperm(40, generator=g)
    r = same_rows_order([(a, a[p]), (c, c[p])])
    assert torch.equal(p[r], torch.arange(40))        # b[r[i]] = a[p[r[i]]] = a[i]
    b = a[p].clone()
    b[3, 2] += 1e-3                                    # one entry off: no longer a permuted copy
    assert same_rows_order([(a, b), (c, c[p])]) is None
    assert same_rows_order([(a, a[p]), (c, c)]) is None   # the second pair in another order
    assert same_rows_order([(a, a[p, :6])]) is None
    nan = a[p].clone()
    nan[0, 0] = float("nan")
    assert same_rows_order([(a, nan)]) is None


def test_weight_matching_stops_at_the_upper_bound(monkeypatch):
    """A descent stops once the objective reaches |A| |B| (nothing can gain more), and the
    invariant start's sorted shortcut gives the same permutations as solving every assignment."""
    from autoperm.match import descent as descent_module
    from autoperm.match import weight as weight_module

    factory, _ = ZOO["mha"]
    torch.manual_seed(12)
    model = factory()
    spec = planted("mha")[1]
    perms = autoperm.random_permutation(spec, seed=4, derangement=True)
    copy = autoperm.permute(model, spec, perms)
    truth = autoperm.invert(perms, spec)
    found, history = weight_module.weight_matching(spec, model.state_dict(), copy.state_dict())
    bound = (sum(float(t.double().pow(2).sum()) for k, t in model.state_dict().items()
                 if k in {ax.tensor for g in spec.groups for ax in g.axes}))
    assert history[-1] == pytest.approx(bound, rel=1e-9)
    assert all(torch.equal(found[g], truth[g]) for g in truth)
    assert weight_module.last_profile["starts"] == 3 and weight_module.last_profile["sorted"] > 0
    vgg = ZOO["vgg"][0]()
    vspec = planted("vgg")[1]
    vperms = autoperm.random_permutation(vspec, seed=4, derangement=True)
    vfound, vhistory = weight_module.weight_matching(vspec, vgg.state_dict(),
                                                     autoperm.permute(vgg, vspec, vperms).state_dict())
    # the pass that reached the bound is the last: no confirming pass without change, no second start
    assert all(x < y for x, y in zip(vhistory, vhistory[1:])), vhistory
    assert weight_module.last_profile["passes"] == len(vhistory)
    assert all(torch.equal(vfound[g], autoperm.invert(vperms, vspec)[g]) for g in vperms)
    monkeypatch.setattr(descent_module, "same_rows_order", lambda pairs: None)
    slow, _ = weight_module.weight_matching(spec, model.state_dict(), copy.state_dict())
    assert all(torch.equal(slow[g], found[g]) for g in found)
