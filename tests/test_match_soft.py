"""Sinkhorn and straight-through (STE) matching: soft permutations honour axis layouts, planted
permutations are recovered, the midpoint loss drops below naive averaging, errors name the
missing parameter, and the caller's models are untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm.match.sinkhorn import sinkhorn, soft_permute_state
from helpers import state_snapshot, trained_mlps
from zoo import ZOO

_SPECS = {}



def planted(name, seed=3):
    if name not in _SPECS:
        factory, inputs = ZOO[name]
        a = autoperm.perturbed(factory(), 0).double()
        spec = autoperm.trace(a, tuple(t.double() if t.is_floating_point() else t for t in inputs()), verify=False)
        _SPECS[name] = (a, spec)
    a, spec = _SPECS[name]
    p = autoperm.random_permutation(spec, seed, derangement=True)
    return a, spec, p, autoperm.permute(a, spec, p)


@pytest.mark.parametrize("name", ["vit", "densenet", "vgg"])
def test_soft_permutation_with_one_hot_matrices_is_permute(name):
    """Layouts with offsets (densenet's cat), outer and inner factors (vit's qkv heads), inner
    blocks (vgg's flatten)."""
    a, spec, p, b = planted(name)
    one_hot = {g: torch.eye(len(q), dtype=torch.float64)[q] for g, q in p.items()}
    soft = soft_permute_state(a.state_dict(), spec, one_hot)
    for k, t in b.state_dict().items():
        assert torch.equal(soft[k], t), k
    uniform = {g: torch.full((len(q), len(q)), 1.0 / len(q), dtype=torch.float64) for g, q in p.items()}
    mixed = soft_permute_state(a.state_dict(), spec, uniform)
    assert any(not torch.equal(mixed[k], t) for k, t in a.state_dict().items()), "negative control"


def test_sinkhorn_operator_is_doubly_stochastic():
    s = sinkhorn(torch.randn(6, 6, dtype=torch.float64) * 3, iters=200)
    assert torch.allclose(s.sum(0), torch.ones(6, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(s.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet20"])
def test_sinkhorn_weight_objective_undoes_a_planted_permutation(name):
    a, spec, p, b = planted(name)
    al = autoperm.match(a, b, spec, method="sinkhorn", steps=40)
    inv = autoperm.invert(p)
    wrong = [g for g in inv if not torch.equal(al.perms[g], inv[g])]
    assert not wrong, f"{name}: groups not recovered: {wrong}"
    assert len(al.history) == 40 and al.history[-1] < 0.01 * al.history[0]


def test_merge_with_sinkhorn_of_permuted_self_is_self_and_seeded():
    a, spec, _, b = planted("mlp", seed=5)
    merged = autoperm.merge(a, b, spec=spec, method="sinkhorn", steps=40)
    sa, sm = a.state_dict(), merged.state_dict()
    assert max((sa[k] - sm[k]).abs().max().item() for k in sa) < 1e-12
    c = autoperm.perturbed(ZOO["mlp"][0](), 9).double()
    p1 = autoperm.align(a, c, spec, method="sinkhorn", steps=15, seed=4)
    p2 = autoperm.align(a, c, spec, method="sinkhorn", steps=15, seed=4)
    assert all(torch.equal(p1[g], p2[g]) for g in p1)


# ----------------------------------------------------------------- the midpoint-loss objectives
_TRAINED = {}


def trained_pair():
    """Two small MLPs trained from different seeds on a synthetic 4-class problem."""
    if not _TRAINED:
        models, x, y = trained_mlps((1, 2))
        data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
        spec = autoperm.trace(models[0], x[:4], verify=False)
        _TRAINED.update(a=models[0], b=models[1], x=x, y=y, data=data, spec=spec)
    return _TRAINED


def midpoint_loss(t, al):
    merged = autoperm.merge(t["a"], t["b"], alignment=al)
    with torch.no_grad():
        return F.cross_entropy(merged(t["x"]), t["y"]).item()


@pytest.mark.parametrize("method, options", [("ste", dict(steps=20, lr=1e-2)), ("sinkhorn", dict(steps=80))])
def test_loss_objectives_beat_naive_averaging(method, options):
    t = trained_pair()
    before_a, before_b = state_snapshot(t["a"]), state_snapshot(t["b"])
    al = autoperm.match(t["a"], t["b"], t["spec"], method=method, data=t["data"], loss_fn=F.cross_entropy,
                        **options)
    naive = autoperm.match(t["a"], t["b"], t["spec"], method="identity")
    assert len(al.history) == options["steps"]
    assert midpoint_loss(t, al) < 0.5 * midpoint_loss(t, naive)
    assert all(torch.equal(before_a[k], v) for k, v in t["a"].state_dict().items())
    assert all(torch.equal(before_b[k], v) for k, v in t["b"].state_dict().items())
    assert not t["a"].training and not t["b"].training


def test_ste_merge_passes_loss_fn_through():
    t = trained_pair()
    merged = autoperm.merge(t["a"], t["b"], spec=t["spec"], method="ste", data=t["data"], loss_fn=F.cross_entropy,
                            steps=3)
    assert type(merged) is nn.Sequential and merged(t["x"]).shape == (256, 4)


def test_sinkhorn_loss_objective_gets_a_lower_soft_loss_than_at_start():
    t = trained_pair()
    al = autoperm.match(t["a"], t["b"], t["spec"], method="sinkhorn", data=t["data"][:1], loss_fn=F.cross_entropy,
                        steps=40)
    assert al.history[-1] < 0.5 * al.history[0]


# ----------------------------------------------------------------- errors
def _pair():
    return (nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)),
            nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)))


_XY = [(torch.randn(4, 5), torch.randint(0, 2, (4,)))]


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="ste", data=_XY), r"method='ste' needs loss_fn=.*torch.nn.functional.cross_entropy"),
    (dict(method="ste", loss_fn=F.cross_entropy), r"method='ste' needs data=.*\(inputs, target\)"),
    (dict(method="sinkhorn", loss_fn=F.cross_entropy), r"method='sinkhorn' with loss_fn=.*needs data="),
    (dict(method="ste", data=[torch.randn(4, 5)], loss_fn=F.cross_entropy), "needs targets"),
    (dict(method="ste", data=_XY, loss_fn="ce"), "pass a callable loss_fn"),
    (dict(method="weight", loss_fn=F.cross_entropy), r"loss_fn= is used only by method='sinkhorn'"),
    (dict(method="activation", data=_XY, steps=3), r"steps= is used only by"),
    (dict(method="sinkhorn", steps=-1), r"steps=-1: pass a non-negative integer"),
    (dict(method="ste", data=_XY, loss_fn=F.cross_entropy, lr=0), r"lr=0: pass a positive, finite learning rate"),
])
def test_errors_name_the_missing_parameter(kwargs, message):
    a, b = _pair()
    with pytest.raises(ValueError, match=message):
        autoperm.match(a, b, **kwargs)
    with pytest.raises(ValueError, match=message):
        autoperm.merge(a, b, **kwargs)


@pytest.mark.parametrize("method", ["ste", "sinkhorn"])
def test_loss_objectives_run_on_batchnorm_models(method):
    """BatchNorm running statistics are interpolated without gradient (batch_norm refuses them)."""
    factory, inputs = ZOO["resnet20"]
    a, b = factory().eval(), factory().eval()
    x = inputs()[0]
    y = torch.arange(x.shape[0]) % 5
    before = state_snapshot(b)
    al = autoperm.match(a, b, method=method, data=[(x, y)], loss_fn=F.cross_entropy, steps=2, example_inputs=x)
    assert len(al.history) >= 2 and all(torch.isfinite(torch.tensor(al.history)))
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
