"""normalize="regression" on partial merges: matched units are refit to the interpolation of A's
and B's units, unmatched units to their own model's (`autoperm.rewrite.partial_normalize.regress_widened`).

Oracles: ``partial=0`` is the plain regression merge; ``partial=1`` on a unit-local model stays
the ensemble; on a linear network an exact refit exists at every gamma, so the widened model
becomes the ensemble (and the plain partial merge, the negative control, is not)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoperm
from autoperm.rewrite.partial import partial_widen
from autoperm.verify import output_error
from helpers import random_batchnorms, state_snapshot


def mlp(seed, act=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)]
    return nn.Sequential(*[m for m in layers if act or not isinstance(m, nn.Tanh)]).double().eval()


def cnn(seed):
    torch.manual_seed(seed)
    return random_batchnorms(nn.Sequential(nn.Conv2d(1, 10, 3, bias=False), nn.BatchNorm2d(10), nn.Conv2d(10, 4, 3),
                                           nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double().eval())


def _setup(make, shape):
    a, b = make(1), make(2)
    data = [torch.randn(64, *shape, dtype=torch.float64) for _ in range(3)]
    al = autoperm.match(a, b, example_inputs=data[0], method="weight")
    b_al = autoperm.permute(b, al.spec, al.perms)
    return a, b, al, data, b_al


def test_partial_zero_is_the_plain_regression_merge_and_one_stays_the_ensemble():
    a, b, al, data, b_al = _setup(mlp, (5,))
    before = state_snapshot(a), state_snapshot(b)
    x = torch.randn(16, 5, dtype=torch.float64)
    plain = autoperm.merge(a, b, alignment=al, alpha=0.3, normalize="regression", data=data)
    p0 = autoperm.merge(a, b, alignment=al, alpha=0.3, partial=0.0, normalize="regression", data=data)
    p1 = partial_widen(a, b, al, alpha=0.3, partial=1.0, normalize="regression", data=data)
    with torch.no_grad():
        assert output_error(plain(x), p0(x)) < 1e-9
        ens = 0.7 * a(x) + 0.3 * b_al(x)
        assert p1.exact_limits and output_error(ens, p1.module(x)) < 1e-9
    for model, snap in zip((a, b), before):
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items()), "caller's model unchanged"


@pytest.mark.parametrize("make,shape", [(lambda s: mlp(s, act=False), (5,)), (cnn, (1, 9, 9))],
                         ids=["linear mlp", "linear cnn+batchnorm"])
def test_a_linear_network_half_widened_is_refit_to_the_ensemble(make, shape):
    a, b, al, data, b_al = _setup(make, shape)
    x = torch.randn(16, *shape, dtype=torch.float64)
    fit = autoperm.merge(a, b, alignment=al, partial=0.5, normalize="regression", data=data, ridge=1e-12)
    bare = autoperm.merge(a, b, alignment=al, partial=0.5)
    with torch.no_grad():
        ens = 0.5 * a(x) + 0.5 * b_al(x)
        assert output_error(ens, fit(x)) < 1e-5
        assert output_error(ens, bare(x)) > 1e-3, "negative control: the half-widened merge alone is not the ensemble"


def test_partial_regression_checks_ridge():
    a, b, al, data, _ = _setup(mlp, (5,))
    with pytest.raises(ValueError, match="ridge=0: pass a finite number > 0"):
        partial_widen(a, b, al, partial=0.5, normalize="regression", data=data, ridge=0)
    with pytest.raises(ValueError, match="ridge= is used only by normalize='regression'"):
        partial_widen(a, b, al, partial=0.5, normalize="repair", data=data, ridge=1.0)


def test_partial_and_pfm_without_example_inputs_use_the_traced_size():
    """merge(a, b, alignment=al, partial=...) with neither example_inputs nor data guessed a
    32x32 input from the first conv and failed in the flatten's view of a 9x9 model ("partial
    merge failed on a graph it cannot widen"); the alignment's traced graph gives the size."""
    a, b = cnn(1), cnn(2)
    x = torch.randn(4, 1, 9, 9, dtype=torch.float64)
    al = autoperm.match(a, b, example_inputs=x, method="weight")
    for kw in ({"partial": 0.5}, {"preserve_first": 1}):
        guessed = autoperm.merge(a, b, alignment=al, **kw)
        given = autoperm.merge(a, b, alignment=al, example_inputs=x, **kw)
        with torch.no_grad():
            assert output_error(given(x), guessed(x)) < 1e-12, kw
