"""normalize="regression": every merged conv / linear layer refit by ridge regression to the
interpolation of the endpoints' outputs (`autoperm.merge.regression`).

Oracles: linear networks, where the refit can reproduce the endpoints' interpolated outputs
exactly (so the merged model equals the ensemble of the two); the normal equations checked by
autograd on the returned model (the gradient of the least-squares objective vanishes at every
refit layer: an independent check of the unfold / group / BatchNorm bookkeeping); the limits
(``preserve_first=0`` is the plain merge, a merge with a permuted copy gives the model back);
negative controls (the plain merge is far from the ensemble; a wrong weight breaks optimality).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm.merge.regression import find_fit_layers, regression_state
from autoperm.frontend import capture
from autoperm.rewrite import original_state_dict, pfm_merge
from autoperm.verify import output_error
from helpers import random_batchnorms, state_snapshot


def linear_mlp(seed, hidden=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 3)).double().eval()


def linear_bn_mlp(seed):
    """Linear (no bias) -> BatchNorm1d -> Linear: the first layer is fit through the BatchNorm, its
    intercept landing in the running mean."""
    torch.manual_seed(seed)
    return random_batchnorms(nn.Sequential(nn.Linear(5, 12, bias=False), nn.BatchNorm1d(12),
                                           nn.Linear(12, 3)).double().eval())


def linear_cnn(seed, bn=False):
    """conv -> conv (no padding, no nonlinearity): the merged first conv's 10 channels span every
    linear function of a 3x3 patch (9 numbers), so the second conv, which sees 3x3 of them, can
    express every linear function of a 5x5 patch: an exact refit exists."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 10, 3, bias=not bn)] + ([nn.BatchNorm2d(10)] if bn else []) + \
        [nn.Conv2d(10, 4, 3, bias=not bn)] + ([nn.BatchNorm2d(4)] if bn else [])
    return random_batchnorms(nn.Sequential(*layers).double().eval())


@pytest.mark.parametrize("make,shape", [(linear_mlp, (5,)), (linear_mlp, (7, 5)), (linear_bn_mlp, (5,)),
                                        (linear_cnn, (1, 9, 9)), (lambda s: linear_cnn(s, bn=True), (1, 9, 9))],
                         ids=["mlp", "mlp on tokens", "mlp+batchnorm1d", "cnn", "cnn+batchnorm"])
def test_linear_networks_are_refit_to_the_ensemble(make, shape):
    """A linear network's merged layers can reproduce the interpolated outputs exactly: the refit
    model is the ensemble (1 - alpha) A + alpha B' on fresh inputs; the plain merge is not."""
    a, b, alpha = make(1), make(2), 0.3
    data = [torch.randn(64, *shape, dtype=torch.float64) for _ in range(3)]
    before = state_snapshot(a), state_snapshot(b)
    al = autoperm.match(a, b, example_inputs=data[0], method="weight")
    b_al = autoperm.permute(b, al.spec, al.perms)
    merged = autoperm.merge(a, b, alignment=al, alpha=alpha, normalize="regression", data=data, ridge=1e-12)
    x = torch.randn(16, *shape, dtype=torch.float64)
    with torch.no_grad():
        ens = (1 - alpha) * a(x) + alpha * b_al(x)
        assert output_error(ens, merged(x)) < 1e-5, "refit linear network == ensemble"
        plain = autoperm.merge(a, b, alignment=al, alpha=alpha)
        assert output_error(ens, plain(x)) > 1e-2, "negative control: the plain merge is not the ensemble"
    assert type(merged) is type(a) and set(merged.state_dict()) == set(a.state_dict())
    for model, snap in zip((a, b), before):
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items()), "caller's model unchanged"


class Mixed(nn.Module):
    """conv (bias) -> relu -> grouped conv (no bias) -> BatchNorm -> relu -> depthwise conv1d view
    -> linear: every refit case (bias, no bias through a BatchNorm, groups, depthwise, conv1d)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c3 = nn.Conv1d(8, 8, 3, padding="same", groups=8)
        self.fc = nn.Linear(8 * 36, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.c2(F.relu(self.c1(x)))))
        h = F.relu(self.c3(h.flatten(2)))
        return self.fc(h.flatten(1))


def mixed(seed):
    torch.manual_seed(seed)
    return random_batchnorms(Mixed().double().eval())


def _grad_at(layer, inp, goal, bn=None):
    """The gradient of ||layer(inp) (-> bn) - goal||^2 / rows at the layer's weights (and bias)."""
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    params = [p.detach().clone().requires_grad_(True) for p in params]
    out = layer._conv_forward(inp, params[0], params[1] if len(params) > 1 else None) \
        if isinstance(layer, nn.modules.conv._ConvNd) else F.linear(inp, *params)
    if bn is not None:
        out = bn(out)
    loss = (out - goal).pow(2).sum() / out.numel()
    return torch.autograd.grad(loss, params)


def test_every_refit_layer_solves_its_normal_equations():
    """At each refit layer of the returned model, the least-squares objective on the data (its own
    inputs in the merged model, the goal from the endpoints) has a vanishing gradient: the unfold,
    group and BatchNorm bookkeeping is right. Control: a perturbed weight has a clear gradient."""
    a, b, alpha = mixed(1), mixed(2), 0.4
    data = [torch.randn(32, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    al = autoperm.match(a, b, example_inputs=data[0])
    b_al = autoperm.permute(b, al.spec, al.perms)
    tg = capture(a, data[0])
    layers = find_fit_layers(tg)
    assert [lay.weight for lay in layers] == ["c1.weight", "c2.weight", "c3.weight", "fc.weight"]
    assert [lay.bn is not None for lay in layers] == [False, True, False, False]
    state = regression_state(tg, autoperm.merge(a, b, alignment=al, alpha=alpha).state_dict(), layers, data,
                             [(tg, a.state_dict()), (tg, b_al.state_dict())], [1 - alpha, alpha], ridge=1e-12)
    merged = mixed(0)
    merged.load_state_dict(state)
    x = torch.cat(data)
    seen: dict = {}

    def grab(model, tag):
        hooks = [getattr(model, n).register_forward_hook(
            lambda mod, inp, out, n=n: seen.__setitem__((tag, n), (inp[0], out))) for n in ("c1", "c2", "bn", "c3", "fc")]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()

    for model, tag in ((merged, "m"), (a, "a"), (b_al, "b")):
        grab(model, tag)
    for name, out in (("c1", "c1"), ("c2", "bn"), ("c3", "c3"), ("fc", "fc")):
        goal = (1 - alpha) * seen[("a", out)][1] + alpha * seen[("b", out)][1]
        layer = getattr(merged, name)
        bn = merged.bn if name == "c2" else None
        grads = _grad_at(layer, seen[("m", name)][0], goal, bn)
        scale = goal.pow(2).mean().sqrt()
        assert max(float(g.abs().max()) for g in grads) < 1e-7 * float(scale), name
        with torch.no_grad():
            layer.weight.add_(0.01 * torch.randn_like(layer.weight))
        off = _grad_at(layer, seen[("m", name)][0], goal, bn)
        assert float(off[0].abs().max()) > 1e-5 * float(scale), f"negative control at {name}"


def test_merge_with_a_permuted_copy_gives_the_model_back():
    a = mixed(3)
    x = torch.randn(16, 3, 6, 6, dtype=torch.float64)
    spec = autoperm.trace(a, x)
    b = autoperm.permute(a, spec, autoperm.random_permutation(spec, 1, derangement=True))
    merged = autoperm.merge(a, b, spec=spec, method="weight", normalize="regression", data=[x])
    probe = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    assert output_error(a(probe), merged(probe)) < 1e-8


def test_pfm_regression_limits_and_merged_part_only():
    """preserve_first=0 with regression is the plain merge(normalize='regression'); with l > 0
    only the merged copy's tensors change; preserving everything refits nothing (the ensemble)."""
    a, b, alpha = linear_mlp(1), linear_mlp(2), 0.3
    for m in (a, b):  # nonlinear, so that the refit is not exact
        m.insert(1, nn.Tanh())
        m.insert(3, nn.Tanh())
    data = [torch.randn(48, 5, dtype=torch.float64) for _ in range(3)]
    x = (data[0][:4],)
    al = autoperm.match(a, b, example_inputs=x)
    plain = autoperm.merge(a, b, alignment=al, alpha=alpha, normalize="regression", data=data)
    p0 = pfm_merge(a, b, al, alpha=alpha, preserve_first=0, normalize="regression", data=data, example_inputs=x)
    probe = torch.randn(16, 5, dtype=torch.float64)
    assert output_error(plain(probe), p0(probe)) < 1e-9
    p1 = autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=1, normalize="regression", data=data,
                        example_inputs=x)
    bare = original_state_dict(autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=1, example_inputs=x))
    sd = original_state_dict(p1)
    changed = {k for k, v in sd.items() if not torch.equal(v, bare[k])}
    assert changed and all(k.startswith("merged.") for k in changed), changed
    p3 = autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=3, normalize="regression", data=data,
                        example_inputs=x)
    b_al = autoperm.permute(b, al.spec, al.perms)
    with torch.no_grad():
        assert output_error((1 - alpha) * a(probe) + alpha * b_al(probe), p3(probe)) < 1e-9


def test_regression_needs_data_and_a_positive_ridge():
    a, b = linear_mlp(1), linear_mlp(2)
    with pytest.raises(ValueError, match="normalize='regression' measures activations and needs data="):
        autoperm.merge(a, b, normalize="regression")
    tg = capture(a, torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="ridge=0.0: pass a finite number > 0"):
        regression_state(tg, a.state_dict(), find_fit_layers(tg), [torch.randn(4, 5, dtype=torch.float64)],
                         [(tg, a.state_dict())], [1.0], ridge=0.0)
    for bad in (0, -1.0, True, "1e-2", float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"ridge={bad!r}: pass a finite number > 0"):
            autoperm.merge(a, b, normalize="regression", data=[torch.randn(8, 5, dtype=torch.float64)], ridge=bad)
    with pytest.raises(ValueError, match="ridge= is used only by normalize='regression'"):
        autoperm.merge(a, b, normalize="repair", data=[torch.randn(8, 5, dtype=torch.float64)], ridge=1.0)
    al = autoperm.match(a, b)
    with pytest.raises(ValueError, match="ridge=-5: pass a finite number > 0"):
        pfm_merge(a, b, al, preserve_first=1, normalize="regression", data=[torch.randn(8, 5, dtype=torch.float64)],
                  example_inputs=torch.randn(2, 5, dtype=torch.float64), ridge=-5)
    assert autoperm.merge(a, b, normalize="regression", data=[torch.randn(8, 5, dtype=torch.float64)],
                          ridge=np.float32(0.5)) is not None, "a numpy number is a number"


@pytest.mark.parametrize("max_bytes", [0, 20_000], ids=["a pass per layer", "gives up mid-run"])
def test_one_pass_equals_a_pass_per_layer(max_bytes, caplog):
    """The one-pass refit (every batch through the graph together) gives the same state as a pass
    per layer (max_bytes=0), and as a run that gives up when its held values grow too large."""
    a, b, alpha = mixed(1), mixed(2), 0.4
    data = [torch.randn(16, 3, 6, 6, dtype=torch.float64) for _ in range(3)]
    al = autoperm.match(a, b, example_inputs=data[0])
    b_al = autoperm.permute(b, al.spec, al.perms)
    tg = capture(a, data[0])
    start = autoperm.merge(a, b, alignment=al, alpha=alpha).state_dict()
    args = (tg, start, find_fit_layers(tg), data, [(tg, a.state_dict()), (tg, b_al.state_dict())], [1 - alpha, alpha])
    with caplog.at_level("INFO", logger="autoperm.merge.regression"):
        one = regression_state(*args)
        assert "passes of its own" not in caplog.text
        other = regression_state(*args, max_bytes=max_bytes)
        assert "passes of its own" in caplog.text
    assert set(one) == set(other)
    changed = [k for k in one if not torch.equal(one[k], start[k])]
    assert {"c1.weight", "c2.weight", "bn.running_mean", "c3.weight", "fc.weight"} <= set(changed)
    assert max(float((one[k] - other[k]).abs().max()) for k in one if one[k].is_floating_point()) < 1e-12


def test_a_batchnorm_no_layer_is_fit_through_is_reported(caplog):
    """A BatchNorm on the input is fed by no conv / linear: its interpolated statistics stay, and
    a warning names it; a BatchNorm that a layer is fit through gives no warning (control)."""
    def net(seed, bn_first):
        torch.manual_seed(seed)
        body = [nn.BatchNorm1d(5), nn.Linear(5, 8)] if bn_first else [nn.Linear(5, 8, bias=False), nn.BatchNorm1d(8)]
        m = nn.Sequential(*body, nn.ReLU(), nn.Linear(8, 3)).double().eval()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm1d):
                    mod.running_mean.uniform_(-1, 1)
        return m
    data = [torch.randn(32, 5, dtype=torch.float64)]
    for bn_first in (True, False):
        caplog.clear()
        with caplog.at_level("INFO", logger="autoperm"):
            autoperm.merge(net(1, bn_first), net(2, bn_first), normalize="regression", data=data)
        said = "regression refit no layer through the BatchNorm of 0.running_mean" in caplog.text
        assert said == bn_first, caplog.text


def test_merge_many_refits_to_the_mean_of_the_aligned_models():
    """Three linear networks: merge_many with regression equals the mean of the three models'
    outputs (the goal is the equal-weight interpolation); without it, it does not."""
    models = [linear_mlp(s) for s in (1, 2, 3)]
    data = [torch.randn(64, 5, dtype=torch.float64) for _ in range(2)]
    merged = autoperm.merge_many(models, normalize="regression", data=data, ridge=1e-12)
    plain = autoperm.merge_many(models)
    x = torch.randn(16, 5, dtype=torch.float64)
    with torch.no_grad():
        mean = sum(m(x) for m in models) / 3
        assert output_error(mean, merged(x)) < 1e-5
        assert output_error(mean, plain(x)) > 1e-2


class Shifted(nn.Module):
    """A linear network with a non-persistent buffer (a keyless constant) that differs per model."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 8), nn.Linear(8, 3)
        self.register_buffer("shift", torch.randn(8), persistent=False)

    def forward(self, x):
        return self.l2(self.l1(x) + self.shift)


def test_each_endpoint_runs_with_its_own_keyless_constants():
    """The goal of model_b is model_b with its own non-persistent buffer (it was model_a's): an
    exact refit of a linear network gives the true ensemble, in merge and in PFM."""
    def make(seed):
        torch.manual_seed(seed)
        return Shifted().double().eval()
    a, b = make(1), make(2)
    assert not torch.equal(a.shift, b.shift)
    data = [torch.randn(64, 5, dtype=torch.float64) for _ in range(2)]
    al = autoperm.match(a, b, example_inputs=data[0], method="weight")
    b_al = autoperm.permute(b, al.spec, al.perms)
    x = torch.randn(16, 5, dtype=torch.float64)
    with torch.no_grad():
        ens = 0.5 * a(x) + 0.5 * b_al(x)
        merged = autoperm.merge(a, b, alignment=al, normalize="regression", data=data, ridge=1e-12)
        assert output_error(ens, merged(x)) < 1e-6
        pfm = pfm_merge(a, b, al, preserve_first=1, normalize="regression", data=data, example_inputs=(data[0][:4],),
                        ridge=1e-12)
        assert output_error(ens, pfm(x)) < 1e-6
        wrong = make(2)
        wrong.shift.copy_(a.shift)  # negative control: the ensemble model_a's constant would give
        assert output_error(0.5 * a(x) + 0.5 * autoperm.permute(wrong, al.spec, al.perms)(x), merged(x)) > 1e-2


class SharedBN(nn.Module):
    """One BatchNorm module after two convs without bias: no conv may be fit through it."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.c2(torch.tanh(self.bn(self.c1(x))))).mean((2, 3)))


def test_a_batchnorm_used_twice_is_not_fit_through():
    torch.manual_seed(0)
    a = SharedBN().double().eval()
    layers = find_fit_layers(capture(a, torch.randn(2, 3, 6, 6, dtype=torch.float64)))
    assert [lay.weight for lay in layers] == ["c1.weight", "c2.weight", "fc.weight"]
    assert all(lay.bn is None for lay in layers), "its running mean would be moved by both fits"


class ListStride(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.tanh(F.conv2d(x, self.w, None, [2], [1], [1])).mean((2, 3)))


def test_conv_with_one_item_stride_lists_is_refit():
    """F.conv2d(x, w, None, [2], [1], [1]) (one item for both spatial dims) crashed the unfold."""
    torch.manual_seed(0)
    a, b = ListStride().double().eval(), ListStride().double().eval()
    tg = capture(a, torch.randn(2, 3, 7, 7, dtype=torch.float64))
    layers = find_fit_layers(tg)
    assert layers[0].conv == ((2, 2), (1, 1), (1, 1), 1)
    data = [torch.randn(16, 3, 7, 7, dtype=torch.float64)]
    state = regression_state(tg, a.state_dict(), layers, data, [(tg, a.state_dict()), (tg, b.state_dict())],
                             [0.5, 0.5])
    assert not torch.equal(state["w"], a.state_dict()["w"]) and torch.isfinite(state["w"]).all()


def test_a_tiny_batchnorm_scale_does_not_blow_up_the_weights():
    """A merged BatchNorm whose scale of one channel is ~1e-6: its conv weights stay near the merged
    ones (the ridge is measured against the BatchNorm's output), the other channels are refit."""
    a, b = linear_cnn(1, bn=True), linear_cnn(2, bn=True)
    with torch.no_grad():  # channel 0's scales nearly cancel in the average: the merged one is 1e-6
        a[1].weight[0], b[1].weight[0] = 1.0, -1.0 + 2e-6
    data = [torch.randn(64, 1, 9, 9, dtype=torch.float64)]
    al = autoperm.match(a, b, example_inputs=data[0], method="identity")
    plain = autoperm.merge(a, b, alignment=al)
    merged = autoperm.merge(a, b, alignment=al, normalize="regression", data=data)
    w, w0 = merged[0].weight.detach(), plain[0].weight.detach()
    assert abs(float(plain[1].weight[0].detach())) < 2e-6
    assert float((w[0] - w0[0]).abs().max()) < 1e-3 * float(w0.abs().max()), "channel 0 keeps its weights"
    assert float((w[1:] - w0[1:]).abs().max()) > 1e-3 * float(w0.abs().max()), "the other channels are refit"


def test_a_batchnorm_with_every_scale_zero_keeps_the_conv():
    """A zero-initialized last BatchNorm (every scale 0, torchvision's zero_init_residual): every
    channel is dead, so the conv keeps its merged weights (the fit would overwrite them against a
    goal of zero that says nothing about them)."""
    a, b = linear_cnn(1, bn=True), linear_cnn(2, bn=True)
    for m in (a, b):
        with torch.no_grad():
            m[3].weight.zero_()
    data = [torch.randn(32, 1, 9, 9, dtype=torch.float64)]
    al = autoperm.match(a, b, example_inputs=data[0], method="identity")
    plain, merged = autoperm.merge(a, b, alignment=al), autoperm.merge(a, b, alignment=al, normalize="regression",
                                                                        data=data)
    assert torch.equal(merged[2].weight, plain[2].weight) and torch.equal(merged[3].running_mean, plain[3].running_mean)
    assert not torch.equal(merged[0].weight, plain[0].weight), "the first conv (live BatchNorm) is refit"


def test_ridge_too_large_for_a_float_is_a_value_error():
    with pytest.raises(ValueError, match="pass a finite number > 0"):
        autoperm.merge(linear_mlp(1), linear_mlp(2), normalize="regression",
                       data=[torch.randn(8, 5, dtype=torch.float64)], ridge=10 ** 400)


@pytest.mark.parametrize("norm", ["repair", "regression"])
def test_combine_without_models_keeps_every_endpoint(norm):
    """combine(models=None) (no model objects, so model_a's constants for all) still measures every
    endpoint: it used to keep the first state only."""
    from autoperm.merging import combine

    a, b = linear_mlp(1), linear_mlp(2)
    for m in (a, b):
        m.insert(1, nn.Tanh())
    data = [torch.randn(48, 5, dtype=torch.float64)]
    al = autoperm.match(a, b, example_inputs=data[0])
    states = [a.state_dict(), autoperm.permute(b, al.spec, al.perms).state_dict()]
    bare = combine(a, states, [0.5, 0.5], al, normalize=norm, data=data, example_inputs=None)
    full = combine(a, states, [0.5, 0.5], al, normalize=norm, data=data, example_inputs=None, models=[a, b])
    x = torch.randn(8, 5, dtype=torch.float64)
    with torch.no_grad():
        assert output_error(full(x), bare(x)) < 1e-12
