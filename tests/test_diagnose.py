"""autoperm.diagnose (variance ratio, vanishing-feature ratio) and autoperm.repair (post-pruning
normalization), the Vanishing Feature paper, sections 3.3, 4.1 and 4.5."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm.demo import DemoNet



def _mlp(seed: int, width: int = 96, depth: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).eval()


def _batches(n: int = 384, dim: int = 64, seed: int = 5) -> list[torch.Tensor]:
    return list(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).split(128))


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.training,
            [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()])


def _unchanged(model: nn.Module, snap) -> bool:
    state, training, hooks = snap
    now = model.state_dict()
    return (all(torch.equal(now[k], v) for k, v in state.items()) and model.training == training
            and [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks)


# ---------------------------------------------------------------------------------------------
# diagnose


def test_naive_average_collapses_and_repair_restores():
    a, b = _mlp(0), _mlp(1)
    data = _batches()
    naive = autoperm.merge(a, b, method="identity")
    snaps = [_snapshot(m) for m in (naive, a, b)]
    d = autoperm.diagnose(naive, [a, b], data)
    assert all(_unchanged(m, s) for m, s in zip((naive, a, b), snaps))
    assert [r.layer for r in d.rows] == ["0", "2", "4", "6"]
    var = [r.variance_ratio for r in d.rows]
    # independent random weights: averaging halves the variance at every layer (0.5, 0.25, ...)
    assert var[0] == pytest.approx(0.5, abs=0.1)
    assert all(v2 < v1 for v1, v2 in zip(var, var[1:])), var
    assert var[-1] < 0.2
    assert all(r.vanishing_ratio < 0.8 for r in d.rows)
    assert d.rows[-1].vanishing_ratio < d.rows[0].vanishing_ratio

    repaired = autoperm.merge(a, b, method="identity", normalize="repair", data=data)
    d2 = autoperm.diagnose(repaired, [a, b], data)
    hidden = d2.rows[:-1]  # REPAIR leaves the output layer alone
    assert all(0.9 < r.variance_ratio <= 1.0 + 1e-6 for r in hidden), d2.table()
    assert all(0.9 < r.vanishing_ratio < 1.1 for r in hidden), d2.table()
    assert d2.rows[-1].variance_ratio > var[-1]


def test_diagnose_identical_models_gives_ones_and_a_table():
    a = _mlp(0)
    d = autoperm.diagnose(a, [a, copy.deepcopy(a)], [(x, torch.zeros(len(x))) for x in _batches()])
    for r in d.rows:
        assert r.variance_ratio == pytest.approx(1.0, abs=1e-9)
        assert r.vanishing_ratio == pytest.approx(1.0, abs=1e-9)
        assert r.feature_norm > 0
    text = d.table()
    assert "var ratio" in text and "vanish ratio" in text and len(text.splitlines()) == 2 + len(d.rows)
    assert str(d) == text


def test_diagnose_conv_net_with_batchnorm():
    a, b = (DemoNet(width=8).eval() for _ in range(2))
    for m, seed in ((a, 1), (b, 2)):  # non-trivial BatchNorm statistics
        m.load_state_dict(autoperm.perturbed(m, seed, dtype=torch.float32).state_dict())
    data = [torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))]
    merged = autoperm.merge(a, b, method="identity")
    d = autoperm.diagnose(merged, [a, b], data)
    convs = [k for k, v in a.state_dict().items() if k.endswith(".weight") and v.dim() == 4]
    assert len(d.rows) == len(convs) + 1  # every conv, shortcut projections included, and the head
    assert d.rows[0].layer == "stem.0" and d.rows[-1].layer == "head"
    assert all(r.variance_ratio > 0 and r.vanishing_ratio > 0 for r in d.rows)


def test_diagnose_errors_name_the_argument():
    a, b = _mlp(0), _mlp(1)
    data = _batches()
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(96, 48\)"):
        autoperm.diagnose(a, [b, nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(48, 96))], data)
    with pytest.raises(ValueError, match=r"endpoints\[0\].*'4.weight' has shape \(10, 96\), expected \(96, 96\)"):
        autoperm.diagnose(a, [_mlp(0, depth=3)], data)
    no_bias = _mlp(1)
    no_bias[0] = nn.Linear(64, 96, bias=False)
    with pytest.raises(ValueError, match=r"endpoints\[0\].*'0.bias' is missing from endpoints\[0\]"):
        autoperm.diagnose(a, [no_bias], data)
    with pytest.raises(TypeError, match="endpoints must be a non-empty list"):
        autoperm.diagnose(a, b, data)
    with pytest.raises(TypeError, match="data must be an iterable"):
        autoperm.diagnose(a, [b], data[0])
    with pytest.raises(ValueError, match="data has no batches"):
        autoperm.diagnose(a, [b], [])


def test_plot_writes_a_file_or_names_the_extra(tmp_path, monkeypatch):
    a, b = _mlp(0, depth=3), _mlp(1, depth=3)
    d = autoperm.diagnose(autoperm.merge(a, b, method="identity"), [a, b], _batches(128))
    pytest.importorskip("matplotlib")
    out = d.plot(tmp_path / "diag.png")
    assert out.exists() and out.stat().st_size > 1000
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"autoperm\[viz\]"):
        d.plot(tmp_path / "again.png")


# ---------------------------------------------------------------------------------------------
# repair after pruning


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return (x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])


def _cnn() -> nn.Module:
    # conv + BN (biased), conv + ReLU (no BN: REPAIR folds into it), bias-free conv + BN, linear head
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def trained_cnn():
    (x, y), test = _digits()
    torch.manual_seed(0)
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x, test


def _magnitude_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy with the smallest ``sparsity`` share of every conv / linear weight set to zero."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                k = int(sparsity * m.weight.numel())
                threshold = m.weight.abs().flatten().kthvalue(k).values
                m.weight[m.weight.abs() <= threshold] = 0.0
    return pruned


@torch.no_grad()
def _accuracy(model: nn.Module, test) -> float:
    x, y = test
    return (model(x).argmax(1) == y).float().mean().item()


def _outputs(model: nn.Module, x: torch.Tensor, kinds) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: got.append(o)) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


def test_repair_recovers_pruned_accuracy(trained_cnn):
    model, x_train, test = trained_cnn
    calib = list(x_train[:512].split(128))
    pruned = _magnitude_prune(model, 0.6)
    snaps = [_snapshot(m) for m in (pruned, model)]
    fixed = autoperm.repair(pruned, model, calib)
    assert all(_unchanged(m, s) for m, s in zip((pruned, model), snaps))
    assert type(fixed) is type(model) and not fixed.training
    acc_ref, acc_pruned, acc_fixed = _accuracy(model, test), _accuracy(pruned, test), _accuracy(fixed, test)
    # measured (8 epochs, seed 0, 60% of each layer zeroed): 0.99 -> 0.44 after pruning -> 0.91 after
    # REPAIR (+47 points); the margin asserted leaves room for other torch builds and BLAS
    assert acc_fixed > acc_pruned + 0.3, (acc_ref, acc_pruned, acc_fixed)
    # zeroed weights stay zero: REPAIR only rescales rows
    for (k, w), (_, wp) in zip(fixed.state_dict().items(), pruned.state_dict().items()):
        if k.endswith("weight") and w.dim() > 1:
            assert torch.equal(w == 0, wp == 0), k

    # the pruned model's features vanish; after REPAIR the variance matches the reference's
    before = autoperm.diagnose(pruned, [model], calib)
    after = autoperm.diagnose(fixed, [model], calib)
    assert before.rows[-1].vanishing_ratio < 0.9
    assert [r.node.startswith("getitem") for r in after.rows] == [True, False, True, False]  # conv + BN
    assert all(r.variance_ratio < 0.9 for r in before.rows[1:]), before.table()
    folded = [after.rows[i] for i in (1, 3)]  # layers 3 and 10: not followed by a BatchNorm
    assert all(r.variance_ratio == pytest.approx(1.0, abs=1e-3) for r in folded), after.table()
    reset = [after.rows[i] for i in (0, 2)]  # conv + BatchNorm: BatchNorm statistics recomputed
    assert all(0.9 < r.variance_ratio < 1.1 for r in reset), after.table()


def test_repaired_statistics_match_reference(trained_cnn):
    model, x_train, _ = trained_cnn
    x = x_train[:512]
    pruned = _magnitude_prune(model, 0.7)
    fixed = autoperm.repair(pruned, model, [x])
    convs_ref = _outputs(model, x, (nn.Conv2d, nn.Linear))
    convs_fix = _outputs(fixed, x, (nn.Conv2d, nn.Linear))
    for i in (1, 3):  # the conv without a BatchNorm after it, and the linear head: mean and std
        ref, fix = (t.movedim(1, -1).reshape(-1, t.shape[1]).double() for t in (convs_ref[i], convs_fix[i]))
        assert torch.allclose(fix.mean(0), ref.mean(0), atol=1e-4), i
        assert torch.allclose(fix.std(0, unbiased=False), ref.std(0, unbiased=False), rtol=1e-4, atol=1e-5), i
    # BatchNorms: running statistics are the repaired model's own statistics on the data (RESET)
    bn_inputs = [t.double() for t in _outputs(fixed, x, (nn.Conv2d,))[0::2]]  # convs 0 and 2 feed BatchNorms
    bns = [m for m in fixed.modules() if isinstance(m, nn.BatchNorm2d)]
    for t, bn in zip(bn_inputs, bns):
        assert torch.allclose(bn.running_mean.double(), t.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(bn.running_var.double(), t.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)


def test_repair_modes_and_errors(trained_cnn):
    model, x_train, _ = trained_cnn
    calib = [x_train[:256]]
    pruned = _magnitude_prune(model, 0.6)
    reset = autoperm.repair(pruned, model, calib, mode="reset")
    sd_p, sd_r = pruned.state_dict(), reset.state_dict()
    changed = {k for k in sd_p if not torch.equal(sd_p[k], sd_r[k])}
    assert changed and all("running" in k for k in changed)  # only BatchNorm statistics
    rescaled = autoperm.repair(pruned, model, calib, mode="rescale")
    lin_ref, lin_res = _outputs(model, calib[0], (nn.Linear,))[0], _outputs(rescaled, calib[0], (nn.Linear,))[0]
    assert torch.allclose(lin_res.std(0, unbiased=False), lin_ref.std(0, unbiased=False), rtol=1e-3)
    with pytest.raises(ValueError, match="mode='bogus'"):
        autoperm.repair(pruned, model, calib, mode="bogus")
    with pytest.raises(ValueError, match=r"reference.*'10.weight'"):
        autoperm.repair(pruned, nn.Sequential(*list(_cnn())[:-1], nn.Linear(128, 7)), calib)
