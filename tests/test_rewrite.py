"""Rewrites: the emitter, Preserve-First Merging (PFM) and permutation layers.

Oracles: float64 functional equivalence (l = 0 is the full merge, l >= L the ensemble, permutation
layers keep the function, also with REPAIR / RESCALE), an independent RESET (nn.BatchNorm in train
mode), REPAIR goal statistics read off the PFM module by hand, fresh-process pickling; negative
controls (a wrong alignment changes PFM's output).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import autoperm
from autoperm.analysis import analyze
from autoperm.frontend import _wrap, capture
from autoperm.rewrite import pfm_merge
from autoperm.rewrite.emit import (EmitError, buffer_keys, emit, flop_count, graph_from_traced, original_state_dict,
                                   output_spec, param_count)
from autoperm.rewrite.pfm import counted_layers, preserved_nodes, reference_pfm, shortcut_projections
from autoperm.verify import output_error
from helpers import float64_inputs, state_snapshot
from zoo import ZOO

_CACHE: dict = {}


def pair(name):
    """Two perturbed float64 models of one zoo architecture, inputs, an alignment with the traced graph."""
    if name not in _CACHE:
        factory, inputs = ZOO[name]
        a, b = autoperm.perturbed(factory(), 0), autoperm.perturbed(factory(), 1)
        x = float64_inputs(inputs())
        traced = capture(a, x)
        al = autoperm.match(a, b, analyze(traced))
        al.traced = traced
        _CACHE[name] = (a, b, x, al)
    return _CACHE[name]


def ensemble(a, b, x, alpha=0.5):
    return (1 - alpha) * a(*x) + alpha * b(*x)


def check_limits(name, alpha=0.5):
    a, b, x, al = pair(name)
    L = len(counted_layers(al.traced))
    full = autoperm.merge(a, b, alignment=al, alpha=alpha)
    p0 = pfm_merge(a, b, al, alpha=alpha, preserve_first=0, example_inputs=x)
    assert output_error(full(*x), p0(*x)) < 1e-5, "preserve_first=0 is the full merge"
    pL = autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=L, example_inputs=x)
    ens = ensemble(a, b, x, alpha)
    assert output_error(ens, pL(*x)) < 1e-5, "preserve_first=L is the ensemble"
    more = autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=L + 3, example_inputs=x)
    assert output_error(ens, more(*x)) < 1e-5
    mid = autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=max(1, L // 2), example_inputs=x)
    assert output_error(full(*x), mid(*x)) > 1e-4 and output_error(ens, mid(*x)) > 1e-4
    shared = al.traced.tied or any(sum(1 for u in n.users if u.op == "call_function") > 1
                                   for n in al.traced.graph.nodes if n.op == "placeholder")
    if not shared:  # a weight used on both sides of the boundary exists three times
        assert param_count(a) < param_count(mid) < param_count(pL) == 2 * param_count(a)
    return L


FAST = ["mlp", "resnet20", "vgg"]


@pytest.mark.parametrize("name", FAST)
def test_pfm_limits(name):
    check_limits(name)


@pytest.mark.parametrize("name", sorted(set(ZOO) - set(FAST)))
def test_pfm_limits_zoo(name):
    check_limits(name)


def test_pfm_limits_other_alpha():
    check_limits("mlp", alpha=0.3)


def test_counted_layers_exclude_shortcut_projections():
    a, _, x, al = pair("resnet20")
    keys = al.traced.state_keys
    short = sorted(keys[n.args[1].name] for n in shortcut_projections(al.traced))
    assert short == ["layers.2.shortcut.0.weight", "layers.4.shortcut.0.weight"]
    layers = counted_layers(al.traced)
    assert len(layers) == 14  # stem + 6 blocks x 2 convs + linear
    assert keys[layers[0].args[1].name] == "conv1.weight" and keys[layers[-1].args[1].name] == "linear.weight"


def test_pfm_wrong_alignment_changes_output():
    a, b, x, al = pair("vgg")
    good = autoperm.merge(a, b, alignment=al, preserve_first=2, example_inputs=x)
    wrong = autoperm.Alignment(autoperm.random_permutation(al.spec, 5, derangement=True), "random", spec=al.spec,
                               traced=al.traced)
    bad = autoperm.merge(a, b, alignment=wrong, preserve_first=2, example_inputs=x)
    assert output_error(good(*x), bad(*x)) > 1e-3


@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_pfm_folds_merge_nodes_into_preserved_weights(name):
    """Merge nodes fed by an affine layer through ReLU / pooling / views become adds; the
    coefficients sit in the preserved copies' weights; the function equals the unfolded
    reference (`reference_pfm`, which interpolates with lerp)."""
    a, b, x, al = pair(name)
    alpha = 0.3
    m = autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=2, example_inputs=x)
    plan = m.autoperm_pfm["folded"]
    assert plan, "a ReLU / pooling boundary after a conv or linear is foldable"
    assert "lerp" not in m.code, "every merge of these models is folded: an add"
    sd = original_state_dict(m)
    bp = autoperm.permute_state_dict(b.state_dict(), al.spec, al.perms)
    for keys in plan.values():
        for k in keys:
            assert torch.allclose(sd[f"model_a.{k}"], (1 - alpha) * a.state_dict()[k], rtol=0, atol=1e-15)
            assert torch.allclose(sd[f"model_b.{k}"], alpha * bp[k], rtol=0, atol=1e-15)
    states = {"model_a": a.state_dict(), "model_b": bp,
              "merged": {k[len("merged."):]: v for k, v in sd.items() if k.startswith("merged.")}}
    ref = reference_pfm(al.traced, states, preserved_nodes(al.traced, 2), alpha, x)[0]
    assert output_error(ref, m(*x)) < 1e-12
    # negative control: undo the scaling of model_b's copy only -> a different function
    own = {v: k for k, v in m.autoperm_keys.items()}
    with torch.no_grad():
        for keys in plan.values():
            for k in keys:
                m.state_dict()[own[f"model_b.{k}"]].copy_(bp[k])
    assert output_error(ref, m(*x)) > 1e-3


def test_pfm_reset_matches_batchnorm_reset_and_spares_preserved():
    a, b, x, al = pair("vgg")
    data = [torch.randn(6, 3, 8, 8, dtype=torch.float64) for _ in range(3)]
    ref = autoperm.merge(a, b, alignment=al, normalize="reset", data=data)
    p0 = pfm_merge(a, b, al, preserve_first=0, normalize="reset", data=data, example_inputs=x)
    assert output_error(ref(*x), p0(*x)) < 1e-9, "RESET of the merged part == nn.BatchNorm RESET"
    p2 = pfm_merge(a, b, al, preserve_first=2, normalize="reset", data=data, example_inputs=x)
    sd, sa = original_state_dict(p2), a.state_dict()
    assert torch.equal(sd["model_a.1.running_mean"], sa["1.running_mean"]), "preserved BatchNorm kept"
    assert torch.equal(sd["model_a.4.running_var"], sa["4.running_var"])
    plain = original_state_dict(pfm_merge(a, b, al, preserve_first=2, example_inputs=x))
    assert not torch.allclose(sd["merged.8.running_mean"], plain["merged.8.running_mean"]), "merged BatchNorm reset"


@pytest.mark.parametrize("mode", ["repair", "rescale", "regression"])
@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_pfm_repair_limits(name, mode):
    """l = 0 with REPAIR / RESCALE is the plain normalized merge; l >= L normalizes nothing (ensemble)."""
    a, b, x, al = pair(name)
    data = [torch.randn(6, *x[0].shape[1:], dtype=torch.float64) for _ in range(3)]
    plain = autoperm.merge(a, b, alignment=al, alpha=0.3, normalize=mode, data=data)
    p0 = pfm_merge(a, b, al, alpha=0.3, preserve_first=0, normalize=mode, data=data, example_inputs=x)
    assert output_error(plain(*x), p0(*x)) < 1e-6, "preserve_first=0 + REPAIR == merge(normalize='repair')"
    sd0, ref = original_state_dict(p0), plain.state_dict()
    assert max(float((sd0[f"merged.{k}"] - v).abs().max()) for k, v in ref.items() if v.is_floating_point()) < 1e-6
    unnormalized = autoperm.merge(a, b, alignment=al, alpha=0.3)
    assert output_error(unnormalized(*x), plain(*x)) > 1e-3, "negative control: the normalization did something"
    L = len(counted_layers(al.traced))
    pL = pfm_merge(a, b, al, alpha=0.3, preserve_first=L, normalize=mode, data=data, example_inputs=x)
    assert output_error(ensemble(a, b, x, 0.3), pL(*x)) < 1e-9, "preserve_first=L + REPAIR is the ensemble"
    bare = original_state_dict(pfm_merge(a, b, al, alpha=0.3, preserve_first=L, example_inputs=x))
    assert all(torch.equal(v, bare[k]) for k, v in original_state_dict(pL).items()), "nothing normalized"


def deep_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                         nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


@pytest.mark.parametrize("mode", ["repair", "rescale"])
def test_pfm_repair_hits_goal_on_merged_layers_only(mode):
    """Oracle by hand: the PFM module's merged pre-activations (layers 4 and 6 after preserving
    layers 0 and 2) get the interpolated endpoint statistics; preserved copies stay A / aligned B."""
    a, b, alpha = deep_mlp(1), deep_mlp(2), 0.3
    data = [torch.randn(64, 5, dtype=torch.float64) for _ in range(4)]
    x = torch.cat(data)
    before = state_snapshot(a), state_snapshot(b)
    al = autoperm.match(a, b, example_inputs=data[0])
    b_al = autoperm.permute(b, al.spec, al.perms)
    m = autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=2, normalize=mode, data=data)
    for model, snap in zip((a, b), before):
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items()), "caller's model unchanged"
    sd = original_state_dict(m)
    bare = original_state_dict(autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=2, example_inputs=x))
    for k, v in sd.items():
        if not k.startswith("merged.") or k.startswith("merged.8."):  # preserved copies, the output layer
            assert torch.equal(v, bare[k]), k
    # layer 2's merge is folded (`pfm_fold`): its copies carry the coefficients, layer 0's do not
    assert m.autoperm_pfm["folded"] == {"relu_1": ["2.weight", "2.bias"]}
    with torch.no_grad():
        for i, ca, cb in ((0, 1.0, 1.0), (2, 1 - alpha, alpha)):
            assert torch.equal(sd[f"model_a.{i}.weight"], ca * a[i].weight) and torch.equal(
                sd[f"model_b.{i}.bias"], cb * b_al[i].bias)

    def lin(ctx, i, z):
        return nn.functional.linear(z, sd[f"{ctx}.{i}.weight"], sd[f"{ctx}.{i}.bias"])

    with torch.no_grad():
        za, zb = (torch.relu(lin(c, 2, torch.relu(lin(c, 0, x)))) for c in ("model_a", "model_b"))
        h4 = lin("merged", 4, za + zb)
        h6 = lin("merged", 6, torch.relu(h4))
        assert output_error(m(x), lin("merged", 8, torch.relu(h6))) < 1e-12, "the hand reading is the module"
        for i, h in ((4, h4), (6, h6)):
            fa, fb = a[:i + 1](x), b_al[:i + 1](x)
            goal_std = (1 - alpha) * fa.std(0, unbiased=False) + alpha * fb.std(0, unbiased=False)
            goal_mean = (1 - alpha) * fa.mean(0) + alpha * fb.mean(0)
            # measured: std relative error 5.6e-7 (= eps / std: repair_state's eps = 1e-8 against stds
            # down to 0.018), mean error 6e-17; tolerances 2e-6 relative and 1e-12 absolute
            assert torch.allclose(h.std(0, unbiased=False), goal_std, rtol=2e-6, atol=0)
            if mode == "repair":
                assert torch.allclose(h.mean(0), goal_mean, rtol=0, atol=1e-12)
            else:
                assert not torch.allclose(h.mean(0), goal_mean, atol=1e-3), "RESCALE leaves means alone"


@pytest.mark.parametrize("mode", ["bias_calibration", "bias_removal"])
@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_pfm_bias_limits(name, mode):
    """The data-free normalizations: l = 0 is the plain merge with them, l >= L changes nothing."""
    a, b, x, al = pair(name)
    extra = {"bias_layers": 1} if mode == "bias_removal" else {}
    plain = autoperm.merge(a, b, alignment=al, alpha=0.3, normalize=mode, **extra)
    p0 = pfm_merge(a, b, al, alpha=0.3, preserve_first=0, normalize=mode, example_inputs=x, **extra)
    assert output_error(plain(*x), p0(*x)) < 1e-9, f"preserve_first=0 + {mode} == merge(normalize={mode!r})"
    unnormalized = autoperm.merge(a, b, alignment=al, alpha=0.3)
    assert output_error(unnormalized(*x), plain(*x)) > 1e-4, "negative control: the biases changed"
    L = len(counted_layers(al.traced))
    pL = pfm_merge(a, b, al, alpha=0.3, preserve_first=L, normalize=mode, example_inputs=x, **extra)
    assert output_error(ensemble(a, b, x, 0.3), pL(*x)) < 1e-9, "preserve_first=L is the ensemble"


def test_pfm_bias_calibration_counts_merge_depth():
    """Oracle by hand: preserving layers 0 and 2 of a 5-layer MLP, the merged layers 4, 6, 8 have
    merge depths 2, 3, 4 (the merge node is one merging step); each bias is (1 - alpha)^d b_A +
    alpha^d b_B; the preserved copies keep their own; bias removal zeroes the merged biases among
    the model's last k counted layers (plain depths 1..5), and k is checked against 5 even when
    every layer is preserved."""
    a, b, alpha = deep_mlp(1), deep_mlp(2), 0.3
    x = torch.randn(32, 5, dtype=torch.float64)
    al = autoperm.match(a, b, example_inputs=x)
    bp = autoperm.permute_state_dict(b.state_dict(), al.spec, al.perms)
    m = autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=2, normalize="bias_calibration",
                       example_inputs=x)
    sd = original_state_dict(m)
    bare = original_state_dict(autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=2, example_inputs=x))
    for i, d in ((4, 2), (6, 3), (8, 4)):
        want = (1 - alpha) ** d * a[i].bias + alpha ** d * bp[f"{i}.bias"]
        assert torch.allclose(sd[f"merged.{i}.bias"], want, rtol=0, atol=1e-15), i
        assert torch.equal(sd[f"merged.{i}.weight"], bare[f"merged.{i}.weight"])
    assert all(torch.equal(v, bare[k]) for k, v in sd.items() if not k.startswith("merged.")), "preserved kept"

    def lin(ctx, i, z):
        return nn.functional.linear(z, sd[f"{ctx}.{i}.weight"], sd[f"{ctx}.{i}.bias"])

    with torch.no_grad():
        za, zb = (torch.relu(lin(c, 2, torch.relu(lin(c, 0, x)))) for c in ("model_a", "model_b"))
        h = torch.relu(lin("merged", 6, torch.relu(lin("merged", 4, za + zb))))
        assert output_error(m(x), lin("merged", 8, h)) < 1e-12, "the hand reading is the module"
        # negative control: the plain merge's biases give another function
        assert output_error(m(x), autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=2,
                                                 example_inputs=x)(x)) > 1e-4
    for k, zeroed in ((1, {8}), (2, {6, 8}), (None, {4, 6, 8})):
        sd = original_state_dict(autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=2,
                                                normalize="bias_removal", bias_layers=k, example_inputs=x))
        for i in (4, 6, 8):
            assert torch.equal(sd[f"merged.{i}.bias"] == 0, torch.full_like(sd[f"merged.{i}.bias"], i in zeroed,
                                                                           dtype=torch.bool)), (k, i)
        assert torch.equal(sd["model_a.0.bias"], bare["model_a.0.bias"]), "preserved biases are kept"
    for k in (5, None):   # every merged bias, never a preserved one
        sd = original_state_dict(autoperm.merge(a, b, alignment=al, alpha=alpha, preserve_first=2,
                                                normalize="bias_removal", bias_layers=k, example_inputs=x))
        assert all(bool((sd[f"merged.{i}.bias"] == 0).all()) for i in (4, 6, 8))
        assert torch.equal(sd["model_b.2.bias"], bare["model_b.2.bias"])
    for pf in (2, 9):
        with pytest.raises(ValueError, match="bias_layers=6: pass an integer from 1 to 5"):
            autoperm.merge(a, b, alignment=al, preserve_first=pf, normalize="bias_removal", bias_layers=6,
                           example_inputs=x)


class SkipNet(nn.Module):
    """fc2(relu(fc1(h))) + skip(h) with h the raw input or its flatten: the same function."""

    def __init__(self, flatten: bool):
        super().__init__()
        torch.manual_seed(0)
        self.flatten = flatten
        self.fc1, self.fc2, self.skip, self.out = (nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(6, 5),
                                                   nn.Linear(5, 2))

    def forward(self, x):
        h = x.flatten(1) if self.flatten else x
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(h))) + self.skip(h)))


def test_pfm_merge_depth_ignores_preserved_ops_on_the_raw_input():
    """A flatten of the raw input, preserved as an ancestor of the first layer, counted as a merge
    step: the skip layer reading it got merge depth 2 instead of 1. Oracle: the same model fed
    the flattened input without the flatten gets the same calibrated biases, and the skip bias is
    the plain interpolation (depth 1)."""
    sds = []
    for flat in (False, True):
        x = torch.randn(16, 2, 3, dtype=torch.float64) if flat else torch.randn(16, 6, dtype=torch.float64)
        a, b = SkipNet(flat).double(), SkipNet(flat).double()
        with torch.no_grad():
            for p in b.parameters():
                p.add_(0.3 * torch.randn_like(p))
        al = autoperm.match(a, b, example_inputs=x)
        m = autoperm.merge(a, b, alignment=al, preserve_first=1, normalize="bias_calibration", example_inputs=x)
        sd = original_state_dict(m)
        bp = autoperm.permute_state_dict(b.state_dict(), al.spec, al.perms)
        assert torch.allclose(sd["merged.skip.bias"], 0.5 * (a.skip.bias + bp["skip.bias"]), rtol=0, atol=1e-15)
        assert torch.allclose(sd["merged.fc2.bias"], 0.25 * (a.fc2.bias + bp["fc2.bias"]), rtol=0, atol=1e-15)
        sds.append(sd)
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_pfm_repair_spares_preserved_batchnorm():
    a, b, x, al = pair("vgg")
    data = [torch.randn(6, 3, 8, 8, dtype=torch.float64) for _ in range(3)]
    sd = original_state_dict(pfm_merge(a, b, al, preserve_first=2, normalize="repair", data=data, example_inputs=x))
    bare = original_state_dict(pfm_merge(a, b, al, preserve_first=2, example_inputs=x))
    assert all(torch.equal(v, bare[k]) for k, v in sd.items() if not k.startswith("merged.")), "preserved kept"
    assert not torch.allclose(sd["merged.8.running_var"], bare["merged.8.running_var"]), "merged BatchNorm reset"
    assert not torch.allclose(sd["merged.12.weight"], bare["merged.12.weight"]), "merged linear repaired"
    assert torch.equal(sd["merged.14.weight"], bare["merged.14.weight"]), "output layer untouched"


def test_pfm_rejects_bad_arguments():
    a, b, x, al = pair("mlp")
    with pytest.raises(ValueError, match="normalize=.bias_removal. is not supported with partial merging"):
        autoperm.merge(a, b, alignment=al, partial=0.5, normalize="bias_removal", example_inputs=x)
    with pytest.raises(ValueError, match="bias_layers= is used only by normalize='bias_removal'"):
        pfm_merge(a, b, al, preserve_first=1, normalize="bias_calibration", bias_layers=1, example_inputs=x)
    with pytest.raises(ValueError, match="bias_layers=7"):
        autoperm.merge(a, b, alignment=al, preserve_first=1, normalize="bias_removal", bias_layers=7,
                       example_inputs=x)
    with pytest.raises(ValueError, match="needs data"):
        pfm_merge(a, b, al, preserve_first=1, normalize="repair", example_inputs=x)
    with pytest.raises(ValueError, match="preserve_first"):
        pfm_merge(a, b, al, preserve_first=-1, example_inputs=x)
    with pytest.raises(ValueError, match="preserve_first"):
        autoperm.merge(a, b, alignment=al, preserve_first=1, partial=0.5)


def test_pfm_leaves_callers_models_untouched():
    def net():
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                             nn.ReLU(), nn.Linear(8, 2)).train()
    a, b = net(), net()
    before = state_snapshot(a), state_snapshot(b)
    m = autoperm.merge(a, b, preserve_first=1, normalize="reset", data=[torch.randn(6, 4) for _ in range(2)])
    assert a.training and b.training
    assert m.training, "the PFM module takes model_a's mode, as every merge does"
    for model, snap in zip((a, b), before):
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert m(torch.randn(5, 4)).shape == (5, 2)


def test_pfm_module_batch_state_dict_and_helpers():
    a, b, x, al = pair("mlp")
    m = autoperm.merge(a, b, alignment=al, preserve_first=1, example_inputs=x)
    x7 = torch.randn(7, 6, dtype=torch.float64)
    y7 = m(x7)
    assert y7.shape == (7, 3) and torch.allclose(m(x7[:3]), y7[:3])
    naive = autoperm.Alignment(autoperm.identity_permutation(al.spec), "identity", spec=al.spec, traced=al.traced)
    fresh = autoperm.merge(a, b, alignment=naive, preserve_first=1, example_inputs=x)  # same graph, other weights
    assert not torch.allclose(fresh(x7), y7)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x7), y7), "state_dict round trip"
    assert sorted(m.state_dict()) == sorted(m.autoperm_keys)
    # parameters: A and B copies of layer 1, merged layers 2-3; FLOPs: layer 1 twice
    n1, rest = 6 * 16 + 16, (16 * 12 + 12) + (12 * 3 + 3)
    assert param_count(m) == 2 * n1 + rest
    assert flop_count(m, x7) == 2 * 7 * (2 * 6 * 16 + 16 * 12 + 12 * 3)
    assert flop_count(a, x7) == 2 * 7 * (6 * 16 + 16 * 12 + 12 * 3)
    assert "lerp" not in m.code and "add" in m.code, "the merge is folded (`pfm_fold`): an add"


def test_whole_module_save_load_in_fresh_process(tmp_path):
    a, b, x, al = pair("resnet20")
    m = autoperm.merge(a, b, alignment=al, preserve_first=5, example_inputs=x)
    x5 = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    path = tmp_path / "pfm.pt"
    torch.save(m, path)
    torch.save((x5, m(x5)), tmp_path / "io.pt")
    code = ("import torch, sys; m = torch.load(sys.argv[1], weights_only=False); x, y = torch.load(sys.argv[2]); "
            "assert 'autoperm' not in sys.modules; print(float((m(x) - y).abs().max()))")
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "io.pt")], capture_output=True,
                         text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) == 0.0


def test_emit_rebuilds_exported_graph_with_original_keys():
    a, _, x, al = pair("resnet20")
    graph, consts = graph_from_traced(al.traced)
    ref = a(*x)
    m = emit(graph, {**a.state_dict(), **consts}, buffers=buffer_keys(a), out_spec=output_spec(ref),
             check_inputs=x, expected=ref)
    assert set(m.state_dict()) <= set(a.state_dict()) and "layers.0.conv1.weight" in m.state_dict()
    assert isinstance(m.get_submodule("layers.0.bn1").get_buffer("running_mean"), torch.Tensor)
    assert not isinstance(m.get_submodule("layers.0.bn1").running_mean, nn.Parameter)
    assert torch.equal(m(*x), ref) and m(torch.randn(3, 3, 8, 8, dtype=torch.float64)).shape == (3, 5)
    with pytest.raises(EmitError, match="not in tensors"):
        emit(graph, {})
    with pytest.raises(EmitError, match="differs from the expected"):
        emit(graph, {**a.state_dict(), **consts}, out_spec=output_spec(ref), check_inputs=x, expected=ref + 1)


def test_emit_unpins_a_static_batch():
    model = autoperm.perturbed(ZOO["functional"][0](), 0)
    x = (torch.randn(2, 3, 8, 8, dtype=torch.float64),)
    ep = torch.export.export(model, x, strict=False).run_decompositions({})
    tg = _wrap(ep, model, False)
    graph, consts = graph_from_traced(tg)
    pinned = emit(graph, dict(model.state_dict()), out_spec=output_spec(model(*x)))
    x5 = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(Exception):
        pinned(x5)  # negative control: the export baked batch 2 into a view
    m = emit(graph, dict(model.state_dict()), out_spec=output_spec(model(*x)), static_batch=2)
    assert torch.allclose(m(x5), model(x5), atol=1e-12)


def test_insert_perm_layers():
    factory, inputs = ZOO["preact_resnet"]
    a, x = autoperm.perturbed(factory(), 3), float64_inputs(inputs())
    before = state_snapshot(a)
    a2, spec2 = autoperm.insert_perm_layers(a, x)  # checks the function in float64 itself
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    keys = sorted(k for k in a2.state_dict() if "skip_perm" in k)
    assert keys == ["1.skip_perm.weight", "2.skip_perm.weight"]
    assert torch.equal(a2.state_dict()[keys[0]].flatten(1), torch.eye(8, dtype=torch.float64))
    assert output_error(a(*x), a2(*x)) < 1e-12, "function unchanged (float64)"
    assert a2(torch.randn(5, 3, 8, 8, dtype=torch.float64)).shape == (5, 3)
    spec = analyze(capture(a, x))
    assert len(spec2.groups) == len(spec.groups) + 2, "each block gets its own group"
    b2, _ = autoperm.insert_perm_layers(autoperm.perturbed(factory(), 4), x, verify=False)
    merged = autoperm.merge(a2, b2, spec=spec2)
    naive = autoperm.merge(a2, b2, spec=spec2, method="identity")
    assert merged(*x).shape == (2, 3) and output_error(naive(*x), merged(*x)) > 1e-6
    p = autoperm.random_permutation(spec2, 1, derangement=True)
    assert autoperm.check_equivalence(a2, spec2, p, x) < 1e-10
    planted = autoperm.permute(a2, spec2, p)
    back = autoperm.merge(a2, planted, spec=spec2)
    assert output_error(a2(*x), back(*x)) < 1e-10, "recovery: merge(A, P(A)) == A"
    with pytest.raises(ValueError, match="no identity skip"):
        autoperm.insert_perm_layers(ZOO["mlp"][0](), ZOO["mlp"][1]())
