"""REPAIR / RESCALE hit their goal statistics and are fused into the model's own weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoperm



def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double().eval()


def pre_activations(model, x):
    h1 = model[0](x)
    h2 = model[2](torch.relu(h1))
    return [h1, h2]


@pytest.mark.parametrize("mode", ["repair", "rescale"])
def test_goal_statistics_are_reached(mode):
    a, b = mlp(1), mlp(2)
    data = [torch.randn(64, 5, dtype=torch.float64) for _ in range(4)]
    x = torch.cat(data)
    alpha = 0.3
    spec = autoperm.trace(a, data[0])
    perms = autoperm.align(a, b, spec)
    b_aligned = autoperm.permute(b, spec, perms)
    merged = autoperm.merge(a, b, spec=spec, alpha=alpha, normalize=mode, data=data)
    assert type(merged) is nn.Sequential and set(merged.state_dict()) == set(a.state_dict())
    with torch.no_grad():
        for fa, fb, fm in zip(pre_activations(a, x), pre_activations(b_aligned, x), pre_activations(merged, x)):
            goal_std = (1 - alpha) * fa.std(0, unbiased=False) + alpha * fb.std(0, unbiased=False)
            assert torch.allclose(fm.std(0, unbiased=False), goal_std, rtol=1e-6)
            goal_mean = (1 - alpha) * fa.mean(0) + alpha * fb.mean(0)
            if mode == "repair":
                assert torch.allclose(fm.mean(0), goal_mean, atol=1e-6)
            else:
                assert not torch.allclose(fm.mean(0), goal_mean, atol=1e-3), "RESCALE leaves means alone"


def test_repair_resets_batchnorm_exactly():
    torch.manual_seed(0)
    def net():
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                             nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    a, b = net(), net()
    data = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    merged = autoperm.merge(a, b, normalize="repair", data=data)
    with torch.no_grad():
        h = merged[0](torch.cat(data))
    assert torch.allclose(merged[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(merged[1].running_var, h.var((0, 2, 3), unbiased=False), rtol=1e-4)


def test_interpolation_curve_and_barriers():
    a, b = mlp(1), mlp(2)
    x = torch.randn(32, 5, dtype=torch.float64)
    curve = autoperm.interpolate(a, b, [0, 0.5, 1], lambda m: {"loss": m(x).pow(2).mean().item()})
    ends = [curve.values[0]["loss"], curve.values[2]["loss"]]
    assert ends[0] == pytest.approx(a(x).pow(2).mean().item())
    assert ends[1] == pytest.approx(b(x).pow(2).mean().item())
    assert curve.loss_barrier() == pytest.approx(max(0.0, curve.values[1]["loss"] - sum(ends) / 2))
    assert autoperm.accuracy_barrier([0, 0.5, 1], [0.9, 0.5, 0.8]) == pytest.approx(0.35)
    assert autoperm.loss_barrier([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="alpha = 0 and alpha = 1"):
        autoperm.loss_barrier([0.5], [1.0])


# ----------------------------------------------------------------- bias calibration and removal
class ShortcutNet(nn.Module):
    """stem -> (conv1 -> conv2) + shortcut conv -> fc: the shortcut shares conv1's depth count."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv1 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.conv2, self.shortcut = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x)
        return self.fc(torch.relu(y).mean((2, 3)))


def test_layers_are_counted_by_depth_in_the_traced_graph():
    from autoperm.frontend import capture
    from autoperm.merge.bias import count_layers

    model = ShortcutNet().eval()
    layers = count_layers(capture(model, (torch.randn(2, 3, 6, 6),)))
    depth = {layer.weight: layer.depth for layer in layers}
    assert depth == {"stem.weight": 1, "conv1.weight": 2, "conv2.weight": 3, "shortcut.weight": 2, "fc.weight": 4}
    assert {layer.bias for layer in layers} == {k.replace("weight", "bias") for k in depth}


@pytest.mark.parametrize("k", [1, 2, None])
def test_bias_removal_zeroes_exactly_the_last_k_layers(k):
    a, b = mlp(1), mlp(2)
    plain = autoperm.merge(a, b).state_dict()
    merged = autoperm.merge(a, b, normalize="bias_removal", bias_layers=k)  # no data needed
    biases = ["0.bias", "2.bias", "4.bias"]  # counted layers 1, 2, 3
    zeroed = biases if k is None else biases[-k:]
    for key, t in merged.state_dict().items():
        if key in zeroed:
            assert torch.equal(t, torch.zeros_like(t)) and plain[key].abs().min() > 0, key
        else:
            assert torch.equal(t, plain[key]), key


def test_bias_removal_counts_branches_by_depth():
    torch.manual_seed(0)
    a, b = ShortcutNet().eval(), ShortcutNet().eval()
    merged = autoperm.merge(a, b, normalize="bias_removal", bias_layers=3).state_dict()
    plain = autoperm.merge(a, b).state_dict()
    assert torch.equal(merged["stem.bias"], plain["stem.bias"])
    assert all(merged[k].abs().max() == 0 for k in ("conv1.bias", "shortcut.bias", "conv2.bias", "fc.bias"))


@pytest.mark.parametrize("alpha", [0.3, 0.0])
def test_bias_calibration_matches_a_hand_computation(alpha):
    a, b = mlp(1), mlp(2)
    spec = autoperm.trace(a, torch.randn(4, 5, dtype=torch.float64))
    bb = autoperm.permute(b, spec, autoperm.align(a, b, spec)).state_dict()
    sa = a.state_dict()
    merged = autoperm.merge(a, b, spec=spec, alpha=alpha, normalize="bias_calibration").state_dict()
    for l, key in enumerate(["0.bias", "2.bias", "4.bias"], start=1):
        hand = (1 - alpha) ** l * sa[key] + alpha ** l * bb[key]
        assert torch.allclose(merged[key], hand, atol=1e-15), key
    for key in ("0.weight", "2.weight", "4.weight"):
        assert torch.allclose(merged[key], (1 - alpha) * sa[key] + alpha * bb[key], atol=1e-15)
    if alpha == 0.0:
        assert all(torch.equal(merged[k], sa[k]) for k in sa), "alpha = 0 gives model_a"


def test_bias_options_are_checked():
    a, b = mlp(1), mlp(2)
    with pytest.raises(ValueError, match=r"bias_layers=4: pass an integer from 1 to 3"):
        autoperm.merge(a, b, normalize="bias_removal", bias_layers=4)
    with pytest.raises(ValueError, match="bias_layers= is used only by normalize='bias_removal'"):
        autoperm.merge(a, b, normalize="bias_calibration", bias_layers=1)


# ----------------------------------------------------------------- REPAIR in one pass over the data
class TiedNet(nn.Module):
    """One linear layer applied twice: correcting it changes a node that has already run."""

    def __init__(self):
        super().__init__()
        self.inp, self.lin, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.lin(torch.relu(self.lin(torch.relu(self.inp(x)))))))


def _bn_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2))


class SkipBN(nn.Module):
    """A conv whose output feeds a BatchNorm and a skip: corrected itself, and measured for the BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        h = self.conv(x)
        y = self.conv2(torch.relu(self.bn(h))) + h
        return self.fc(torch.relu(y).mean((2, 3)))


def _repair_case(name):
    """(traced graph, state to correct, layers, data, goal) with every parameter and buffer random."""
    from autoperm.frontend import capture
    from autoperm.merge.repair import channel_moments, find_layers

    torch.manual_seed(0)
    make, shape = {"shortcut": (ShortcutNet, (3, 6, 6)), "bn": (_bn_net, (3, 8, 8)), "tied": (TiedNet, (5,)),
                   "skip_bn": (SkipBN, (3, 6, 6))}[name]
    models = []
    for _ in range(2):
        m = make().double().eval()
        with torch.no_grad():
            for t in m.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.rand_like(t) + 0.5 if t.dim() == 1 else torch.randn_like(t))
        models.append(m)
    data = [torch.randn(n, *shape, dtype=torch.float64) for n in (8, 3, 5)]
    tg = capture(models[0], (data[0],))
    layers = find_layers(tg, {k for k in models[0].state_dict() if k.endswith("weight")})
    dense = [layer for layer in layers if layer.kind == "dense"]
    goal = channel_moments(tg, models[1].state_dict(), data, dense)
    return tg, models[0].state_dict(), layers, data, goal


def _count_passes(monkeypatch):
    from autoperm.merge import repair as rp

    calls = []
    real = rp.channel_moments
    monkeypatch.setattr(rp, "channel_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("name", ["shortcut", "bn", "skip_bn"])
def test_one_pass_repair_equals_a_pass_per_layer(name, monkeypatch):
    from autoperm.merge import repair as rp

    tg, state, layers, data, goal = _repair_case(name)
    assert any(layer.kind == "dense" for layer in layers)
    calls = _count_passes(monkeypatch)
    one = rp.repair_state(tg, state, layers, data, goal)
    assert calls == []  # no pass per layer
    per_layer = rp.repair_state(tg, state, layers, data, goal, max_bytes=0)  # told not to try: falls back
    assert len(calls) == len(layers)
    assert set(one) == set(per_layer) and all(torch.equal(one[k], per_layer[k]) for k in one)
    changed = [k for k in one if not torch.equal(one[k], state[k])]
    assert len(changed) >= len(layers)  # every layer was corrected (a control that the comparison bites)
    # layers given out of graph order are put in order, whichever way it runs
    shuffled = rp.repair_state(tg, state, layers[::-1], data, goal)
    assert all(torch.equal(shuffled[k], one[k]) for k in one)


def test_one_pass_repair_gives_up_before_a_node_exceeds_its_memory_budget(monkeypatch):
    from autoperm.merge import repair as rp
    from autoperm.merge.staged import StagedRun, StagedTooLarge

    tg, state, layers, data, goal = _repair_case("shortcut")
    first = next(n for n in tg.graph.nodes if n.op == "call_function")
    one_batch = StagedRun(tg, state, [(data[0],)]).advance_to(first.name)[0]
    budget = one_batch.numel() * one_batch.element_size() * 2  # the first node fits for 2 of 3 batches at most
    run = StagedRun(tg, state, [(x,) for x in data], max_bytes=budget)
    with pytest.raises(StagedTooLarge, match=first.name):
        run.advance_to(first.name)
    assert first not in run.interps[1].env and first not in run.interps[2].env  # stopped after the first batch
    calls = _count_passes(monkeypatch)
    small = rp.repair_state(tg, state, layers, data, goal, max_bytes=budget)
    assert len(calls) == len(layers)   # fell back
    full = rp.repair_state(tg, state, layers, data, goal, max_bytes=None)
    assert all(torch.equal(small[k], full[k]) for k in full)


def test_one_pass_repair_is_not_tried_on_weights_read_before_their_correction(monkeypatch):
    from autoperm.merge import repair as rp

    tg, state, layers, data, goal = _repair_case("tied")
    assert "lin.weight is read by" in rp._read_before(tg, rp._in_graph_order(tg, layers))
    assert rp._read_before(tg, _repair_case("shortcut")[2]) is None
    calls = _count_passes(monkeypatch)
    fixed = rp.repair_state(tg, state, layers, data, goal)
    assert len(calls) == len(layers)   # a pass per layer, which sees the twice-corrected weight everywhere
    per_layer = rp.repair_state(tg, state, layers, data, goal, max_bytes=0)
    assert all(torch.equal(fixed[k], per_layer[k]) for k in fixed)


def test_staged_run_matches_a_full_run_after_a_state_change():
    from autoperm.frontend import capture
    from autoperm._stats import run_graph
    from autoperm.merge.staged import StagedRun

    torch.manual_seed(0)
    model = ShortcutNet().double().eval()
    xs = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    tg = capture(model, (xs[0],))
    state = model.state_dict()
    conv = [n.name for n in tg.graph.nodes if n.name.startswith("conv2d")]
    last = [n.name for n in tg.graph.nodes if n.op != "output"][-1]
    run = StagedRun(tg, state, [(x,) for x in xs])
    with pytest.raises(RuntimeError, match="not held"):
        run.rerun(conv[1])  # has not run
    run.advance_to(conv[1])
    new = dict(state, **{"conv1.weight": state["conv1.weight"] * 2})
    run.set_state("conv1.weight", new["conv1.weight"])
    got = run.rerun(conv[1])
    got_last = run.advance_to(last)
    for x, g, gl in zip(xs, got, got_last):
        want = run_graph(tg, new, (x,), {conv[1], last})
        assert torch.equal(g, want[conv[1]]) and torch.equal(gl, want[last])
        assert not torch.equal(gl, run_graph(tg, state, (x,), {last})[last])  # the change reached the output
    assert run.live > 0
    with pytest.raises(RuntimeError, match="not held"):
        run.value(conv[0])  # freed after its last use
    with pytest.raises(KeyError, match="no node named"):
        run.advance_to("no_such_node")
