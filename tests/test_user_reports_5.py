"""Regressions from the fifth new-user trial (matching options and curves): a NaN inside a curve
reported a barrier of 0, options a method does not use were silently ignored, and curves took a
one-shot generator, empty or non-number alphas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def test_a_nan_inside_the_curve_gives_a_nan_barrier():
    nan = float("nan")
    assert math.isnan(autoperm.loss_barrier([0, 0.5, 1], [1.0, nan, 1.0]))
    assert math.isnan(autoperm.accuracy_barrier([0, 0.5, 1], [0.9, nan, 0.9]))
    assert autoperm.loss_barrier([0, 0.5, 1], [1.0, 3.0, 1.0]) == 2.0  # control: a finite curve
    with pytest.raises(ValueError, match="repeat a value"):
        autoperm.loss_barrier([0, 0, 1], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("kw, words", [
    (dict(method="activation", max_iter=5), "max_iter= is used only by method='weight' and method='ste'"),
    (dict(method="sinkhorn", features="all"), "features= is used only by method='activation'"),
    (dict(method="weight", features="all"), "features= is used only by method='activation'"),
    (dict(method="sinkhorn", data="batches"), "uses data= only with loss_fn="),
    (dict(method="ste", loss_fn=F.cross_entropy, lr=float("inf")), "lr=inf: pass a positive, finite"),
    (dict(seed="a"), "seed='a': pass an integer"),
    (dict(seed=1.9), "seed=1.9: pass an integer"),
])
def test_match_refuses_options_it_would_ignore(kw, words):
    a, b = _mlp(1), _mlp(2)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    kw = dict(kw)
    if kw.get("data") == "batches" or kw.get("method") in ("activation", "ste"):
        kw["data"] = [(x, y)] if kw["method"] == "ste" else [x]
    with pytest.raises(ValueError, match=words):
        autoperm.match(a, b, **kw)


def test_interpolate_reuses_a_generator_and_checks_alphas():
    """A one-shot generator was used up by the first alpha ("needs at least 2 samples ... got 0").
    Oracle: the same curve with a list."""
    a, b = _mlp(1), _mlp(2)
    batches = [torch.randn(32, 5) for _ in range(2)]
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def loss(m):
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    kw = dict(method="activation", normalize="repair")
    got = autoperm.interpolate(a, b, [0, 0.5, 1], loss, data=(t for t in batches), **kw)
    ref = autoperm.interpolate(a, b, [0, 0.5, 1], loss, data=batches, **kw)
    assert got.series("value") == ref.series("value")
    for bad in ([], ["0", 1], [0, float("nan"), 1], [True, 1]):
        with pytest.raises(ValueError, match="alphas="):
            autoperm.interpolate(a, b, bad, loss)
    # sinkhorn's weight distance needs no data: data= for the normalization is not refused
    curve = autoperm.interpolate(a, b, [0, 1], loss, method="sinkhorn", steps=5, data=batches, normalize="repair")
    assert len(curve.series("value")) == 2
