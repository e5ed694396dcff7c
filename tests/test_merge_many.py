"""merge_many: permuted copies of one model merge back to it, two models give merge, the
reference="first" result is the explicit average, and alignment beats naive averaging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autoperm
from helpers import state_snapshot, trained_mlps
from zoo import ZOO



_SPECS = {}


def base(name):
    if name not in _SPECS:
        factory, inputs = ZOO[name]
        a = autoperm.perturbed(factory(), 0).double()
        _SPECS[name] = (a, autoperm.trace(a, tuple(t.double() for t in inputs()), verify=False))
    return _SPECS[name]


def max_diff(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    return max((s1[k].double() - s2[k].double()).abs().max().item() for k in s1 if s1[k].is_floating_point())


@pytest.mark.parametrize("name, reference", [("mlp", "average"), ("resnet20", "average"), ("vgg", "first")])
def test_permuted_copies_merge_back_to_the_first(name, reference):
    a, spec = base(name)
    copies = [autoperm.permute(a, spec, autoperm.random_permutation(spec, s, derangement=True)) for s in (1, 2)]
    before = [state_snapshot(m) for m in copies]
    merged = autoperm.merge_many([a] + copies, spec=spec, reference=reference)
    assert type(merged) is type(a)
    assert max_diff(merged, a) < 1e-12
    assert all(torch.equal(b[k], v) for b, m in zip(before, copies) for k, v in m.state_dict().items())
    naive = autoperm.merge_many([a] + copies, spec=spec, method="identity")
    assert max_diff(naive, a) > 1e-3, "negative control: without alignment the average is not A"


@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_two_models_give_merge(name):
    a, spec = base(name)
    b = autoperm.perturbed(ZOO[name][0](), 7).double()
    assert max_diff(autoperm.merge_many([a, b], spec=spec), autoperm.merge(a, b, spec=spec)) == 0.0


def test_reference_first_is_the_explicit_average():
    a, spec = base("mlp")
    b, c = (autoperm.perturbed(ZOO["mlp"][0](), s).double() for s in (5, 6))
    merged = autoperm.merge_many([a, b, c], spec=spec, reference="first")
    pb, pc = autoperm.align(a, b, spec), autoperm.align(a, c, spec)
    sa, sb, sc = a.state_dict(), autoperm.permute(b, spec, pb).state_dict(), autoperm.permute(c, spec, pc).state_dict()
    sm = merged.state_dict()
    assert all(torch.allclose(sm[k], (sa[k] + sb[k] + sc[k]) / 3, atol=1e-14) for k in sm)


def test_alignment_beats_naive_averaging_and_normalizations_run():
    models, x, y = trained_mlps(range(3))
    spec = autoperm.trace(models[0], x[:4], verify=False)

    def loss(m):
        with torch.no_grad():
            return F.cross_entropy(m(x), y).item()

    aligned = autoperm.merge_many(models, spec=spec)
    naive = autoperm.merge_many(models, spec=spec, method="identity")
    assert loss(aligned) < loss(naive)
    data = list(x.split(64))
    repaired = autoperm.merge_many(models, spec=spec, normalize="repair", data=data, reference="first")
    lined_up = [autoperm.permute(m, spec, autoperm.align(models[0], m, spec)) for m in models]
    with torch.no_grad():
        h = [m[0](x) for m in lined_up]
        goal = sum(t.std(0, unbiased=False) for t in h) / 3
    assert torch.allclose(repaired[0](x).std(0, unbiased=False), goal, rtol=1e-4), "goal: mean of 3 stds"
    cal = autoperm.merge_many(models, spec=spec, normalize="bias_calibration")
    mean_bias = aligned.state_dict()["4.bias"]
    assert torch.allclose(cal.state_dict()["4.bias"], mean_bias / 9, atol=1e-7), "(1/3)^3 * sum = mean / 9"


def test_errors():
    a, spec = base("mlp")
    with pytest.raises(ValueError, match="at least two models"):
        autoperm.merge_many([a])
    with pytest.raises(ValueError, match="reference='median'"):
        autoperm.merge_many([a, a], reference="median")
    with pytest.raises(ValueError, match="normalize='reset' measures activations and needs data="):
        autoperm.merge_many([a, a], normalize="reset")
    wrong = autoperm.perturbed(ZOO["mlp"][0](), 3).float()     # float32 beside float64 models
    with pytest.raises(ValueError, match=r"in models\[0\] but torch.float32 .* in models\[2\]"):
        autoperm.merge_many([a, a, wrong])


def test_activation_matching_exports_once_with_the_same_result(monkeypatch):
    """merge_many with activation matching aligns every model to the first or to copies of it
    with averaged weights: one export serves every call (it exported once per call before), and
    the result is exactly what compiling per call gives."""
    import autoperm.merging as merging
    import autoperm.many as many

    models, x, _ = trained_mlps(range(4))
    data = list(x.split(64))
    calls = []
    real_capture = merging.capture
    monkeypatch.setattr(merging, "capture", lambda *a, **k: calls.append(1) or real_capture(*a, **k))
    once = autoperm.merge_many(models, method="activation", data=data)
    assert len(calls) == 1
    real_match = many.match_compiled
    monkeypatch.setattr(many, "match_compiled", lambda a, b, spec, compiled, **kw: real_match(a, b, spec, None, **kw))
    per_call = autoperm.merge_many(models, method="activation", data=data)
    assert len(calls) > 4                                    # control: compiling per call exports every time
    assert max_diff(once, per_call) == 0.0
    assert max_diff(once, autoperm.merge_many(models, method="identity")) > 1e-3   # alignment did something
