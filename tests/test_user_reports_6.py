"""Regressions from the sixth new-user trial (specs used with the wrong model, coverage, tables,
loaders): a saved spec loaded without error on a deeper model and permuting with it changed the
model's function; coverage and pictures accepted models the spec was not compiled for; malformed
spec files and wrong argument types gave raw Python errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import autoperm
from helpers import random_batchnorms
from autoperm import Axis, Frozen, PermutationSpec, ShapeMismatchError, SpecError
from autoperm.cli import main
from autoperm.viz import plot_curve, render_spec


class Residual(nn.Module):
    """A residual MLP of ``depth`` blocks: a spec of depth 1 names a subset of depth 2's tensors."""

    def __init__(self, depth: int):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8)) for _ in range(depth))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(torch.relu(h))


class TiedLM(nn.Module):
    def __init__(self, tie: bool = True):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(20, 16), nn.Linear(16, 16), nn.Linear(16, 20, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.relu(self.fc(self.emb(t))))


def _mlp(h: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 3))


def _write_factory(tmp_path, body: str) -> str:
    (tmp_path / "net.py").write_text("import torch\nfrom torch import nn\n" + body)
    return f"{tmp_path / 'net.py'}:make"


# ----------------------------------------------------------------- 1: a spec of another model
def test_spec_of_a_shallower_model_is_refused_by_load_permute_and_merge(tmp_path):
    shallow, deep, x = Residual(1), Residual(2), torch.randn(3, 4)
    spec = autoperm.trace(shallow, x)
    spec.save(tmp_path / "s.json")
    with pytest.raises(ShapeMismatchError, match=r"'blocks\.1\.0\.weight'.*trace this model"):
        PermutationSpec.load(tmp_path / "s.json", deep)
    stale = PermutationSpec.load(tmp_path / "s.json")
    perms = autoperm.random_permutation(stale, seed=0, derangement=True)
    with pytest.raises(ShapeMismatchError, match=r"'blocks\.1\.0\.weight'"):
        autoperm.permute(deep, stale, perms)
    with pytest.raises(ShapeMismatchError, match=r"'blocks\.1\.0\.weight'"):
        autoperm.merge(deep, Residual(2), spec=stale)
    # why it matters: applied anyway, the stale spec changes the deeper model's function
    moved = Residual(2)
    moved.load_state_dict(autoperm.permute_state_dict(deep.state_dict(), stale, perms))
    with torch.no_grad():
        assert (moved(x) - deep(x)).abs().max() > 1e-3
    # control: the model it was traced from loads, and permuting it keeps its function
    loaded = PermutationSpec.load(tmp_path / "s.json", shallow)
    with torch.no_grad():
        assert torch.allclose(autoperm.permute(shallow, loaded, perms)(x), shallow(x), atol=1e-5)


@pytest.mark.parametrize("make, inputs", [
    (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)),
     lambda: torch.randn(2, 2, 4, 4)),                                   # num_batches_tracked, running stats
    (TiedLM, lambda: torch.randint(0, 20, (2, 5))),                      # tied weights: two keys, one tensor
])
def test_check_model_accepts_the_model_the_spec_was_traced_from(make, inputs):
    model = make()
    spec = autoperm.trace(model, inputs())
    spec.check_model(model.state_dict())
    spec.check_model(model)  # a module is accepted too
    extra = dict(model.state_dict(), stray=torch.zeros(2))
    with pytest.raises(ShapeMismatchError, match="'stray'"):  # control: one unknown tensor is refused
        spec.check_model(extra)
    hand = PermutationSpec(spec.groups, spec.frozen)  # a hand-written spec without shapes checks nothing
    hand.check_model(extra)


# ----------------------------------------------------------------- 12: malformed files, wrong types
_GOOD = {"format": "autoperm.PermutationSpec", "version": 1,
         "groups": [{"name": "g", "size": 2, "axes": [{"tensor": "a", "dim": 0}]}], "shapes": {"a": [2, 3]}}


@pytest.mark.parametrize("patch, words", [
    (lambda d: [], "the JSON holds list"),
    (lambda d: d["groups"][0].update(size="x") or d, r"field groups\[0\]\.size must be an integer, got 'x'"),
    (lambda d: d["groups"][0]["axes"][0].update(dim="0") or d, r"field groups\[0\]\.axes\[0\]\.dim must be an integer"),
    (lambda d: d["groups"][0]["axes"][0].update(bogus=1) or d, r"groups\[0\]\.axes\[0\] has unknown fields"),
    (lambda d: d.update(shapes={"a": ["2", 3]}) or d, r"field shapes\['a'\]\[0\] must be an integer"),
    (lambda d: d.update(frozen=[{"tensor": "a", "dim": 1, "size": 3}]) or d, r"field frozen\[0\]\.reason is missing"),
    (lambda d: d.update(groups=[3]) or d, r"groups\[0\] must be an object"),
])
def test_load_names_the_malformed_field(tmp_path, patch, words):
    data = patch(json.loads(json.dumps(_GOOD)))
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match=words):
        PermutationSpec.load(tmp_path / "s.json")
    (tmp_path / "ok.json").write_text(json.dumps(_GOOD))  # control: the unpatched file loads
    assert PermutationSpec.load(tmp_path / "ok.json").group("g").axes == [Axis("a", 0)]


@pytest.mark.parametrize("bad", ["not a model", torch.randn(3), {"epoch": 3}])
def test_load_refuses_a_model_argument_of_the_wrong_type(tmp_path, bad):
    model = _mlp()
    autoperm.trace(model, torch.randn(2, 4)).save(tmp_path / "s.json")
    with pytest.raises(TypeError, match=r"PermutationSpec.load\(model=\.\.\.\)"):
        PermutationSpec.load(tmp_path / "s.json", bad)
    assert PermutationSpec.load(tmp_path / "s.json", model.state_dict()).shapes  # control: a state dict


# ----------------------------------------------------------------- 4, 5, 7: coverage
def test_coverage_refuses_a_model_the_spec_was_not_compiled_for():
    spec = autoperm.trace(_mlp(16), torch.randn(2, 4))
    with pytest.raises(ShapeMismatchError, match=r"'0.weight' has shape \[8, 4\]"):
        autoperm.coverage(spec, _mlp(8))
    with pytest.raises(ShapeMismatchError, match="'0.weight'"):
        autoperm.coverage(spec, nn.Sequential(nn.Conv2d(1, 16, 3)))
    cov = autoperm.coverage(spec, _mlp(16))  # control: its own model, shares within [0, 1]
    assert 0 < cov.param_share <= 1 and cov.hidden_share == 1.0 and cov.hidden_atoms == 32


def test_coverage_names_swapped_or_wrong_arguments():
    model = _mlp()
    spec = autoperm.trace(model, torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"arguments swapped\? call coverage\(spec, model\)"):
        autoperm.coverage(model, spec)
    with pytest.raises(TypeError, match=r"coverage\(model=\.\.\.\) .* got OrderedDict"):
        autoperm.coverage(spec, model.state_dict())


def test_coverage_leaves_out_a_tied_heads_vocabulary():
    tied = TiedLM()
    cov = autoperm.coverage(autoperm.trace(tied, torch.randint(0, 20, (2, 5))), tied)
    assert (cov.hidden_atoms, cov.hidden_grouped, cov.hidden_share) == (32, 32, 1.0)
    untied = TiedLM(tie=False)  # control: the same count when the head is frozen as "model output"
    cov = autoperm.coverage(autoperm.trace(untied, torch.randint(0, 20, (2, 5))), untied)
    assert (cov.hidden_atoms, cov.hidden_share) == (32, 1.0)


def test_coverage_leaves_out_outputs_recorded_in_meta():
    """An output frozen first for another reason (here: a sort returns positions) keeps that reason;
    ``spec.meta["outputs"]`` lists it as the model's output, and coverage leaves it out."""
    class Sorted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 5)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).sort(-1)[0]

    model = Sorted()
    spec = autoperm.trace(model, torch.randn(2, 4))
    spec.meta["outputs"] = [["b.weight", 0, 0, 1, 5, 1]]
    assert autoperm.coverage(spec, model).hidden_share == 1.0
    del spec.meta["outputs"]  # control: without the record the 5 outputs count as ungrouped channels
    assert autoperm.coverage(spec, model).hidden_atoms == 13


def test_coverage_counts_attention_input_projections():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn = nn.Linear(8, 16), nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.attn(h, h, h, need_weights=False)[0]

    model = M()
    spec = autoperm.trace(model, torch.randn(2, 5, 8))
    cov = autoperm.coverage(spec, model)
    assert spec.shapes["attn.in_proj_weight"] == (48, 16)
    assert cov.hidden_atoms == 16 + 48 and cov.hidden_share == 1.0  # inp's 16 and the 48 q / k / v rows


def test_coverage_of_nothing_is_nan_and_the_cli_says_n_a(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(3, 2))
    cov = autoperm.coverage(autoperm.trace(model, torch.randn(2, 3)), model)
    assert cov.hidden_atoms == 0 and math.isnan(cov.hidden_share) and cov.param_share == 0.0
    target = _write_factory(tmp_path, "def make():\n    return nn.Sequential(nn.Linear(3, 2))\n")
    assert main(["spec", target, "--input-shape", "2,3", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "Coverage: n/a of 0 hidden channels grouped, 0.0% of 8 parameters" in out and "nan" not in out


# ----------------------------------------------------------------- 6, 19: pictures
def test_render_spec_refuses_another_model_before_writing(tmp_path):
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    spec = autoperm.trace(cnn, torch.randn(2, 3, 6, 6))
    with pytest.raises(ShapeMismatchError, match="'0.weight'"):
        render_spec(spec, tmp_path / "o.dot", model=nn.Sequential(nn.Linear(4, 4)), example_inputs=torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"render_spec\(spec=\.\.\.\) must be a PermutationSpec"):
        render_spec(cnn, tmp_path / "s.dot")
    assert not list(tmp_path.iterdir())
    out = render_spec(spec, tmp_path / "ok.dot", model=cnn, example_inputs=torch.randn(2, 3, 6, 6))  # control
    assert out.read_text().startswith("digraph") and "1 groups" in out.read_text()


def test_plot_curve_refuses_no_curves(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match=r"plot_curve\(curves=\.\.\.\) is empty"):
        plot_curve({}, tmp_path / "c.png")
    with pytest.raises(TypeError, match="entry 'a' is a list"):
        plot_curve({"a": [1, 2]}, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
    curve = autoperm.Curve([0.0, 1.0], [{"value": 0.5}, {"value": 0.7}])  # control: one curve is drawn
    assert plot_curve({"x": curve}, tmp_path / "c.png").stat().st_size > 0


# ----------------------------------------------------------------- 14, 15, 16: the table
def test_frozen_reasons_strip_only_the_location_suffix():
    branch = ("the model computes differently at batch 1 (the example) than at batch 2 (a branch on the batch "
              "size?), so no spec holds for both: trace with an example batch of 2 or more")
    spec = PermutationSpec([], [Frozen("a.weight", 0, 8, branch), Frozen("a.weight", 1, 4, "model input"),
                                Frozen("b.weight", 1, 8, "convolution window (spatial dims) at layer1.0 (m.py:88)"),
                                Frozen("b.weight", 2, 3, "convolution window (spatial dims) at (m.py:90)"),
                                Frozen("b.weight", 0, 2, "no rule for aten.foo at blocks.0")],
                           {"a.weight": (8, 4), "b.weight": (2, 8, 3)})
    merged = spec.frozen_reasons(locations=False)
    assert merged == {branch: 1, "model input": 1, "convolution window (spatial dims)": 2, "no rule for aten.foo": 1}
    assert branch in spec.table()
    assert len(spec.frozen_reasons()) == 5  # control: with locations, the two places stay apart


def test_describe_shows_a_partial_block_at_offset_zero():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(4, 16), nn.Linear(4, 8), nn.Linear(24, 3)

        def forward(self, x):
            return self.fc(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))

    assert Axis("fc.weight", 1).describe(16, 24) == "[0:16] as (1,16,1)"
    assert Axis("fc.weight", 1).describe(16) == "[0:16] as (1,16,1)"  # no length: never "whole dim"
    assert Axis("fc.weight", 1).describe(24, 24) == ""  # control: the whole dim
    rows = {line.split()[0]: line for line in autoperm.trace(Net(), torch.randn(2, 4)).table().splitlines()}
    assert "a [0:16] as (1,16,1), b [16:24] as (1,8,1)" in rows["fc.weight"]
    assert "[" not in rows["a.weight"].split("]", 1)[1]  # control: a whole-dim axis has no layout


def test_table_marks_size_one_dims_and_explains_them():
    spec = autoperm.trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), torch.randn(2, 1, 5, 5))
    table = spec.table()
    row = next(line for line in table.splitlines() if line.startswith("2.weight"))
    assert row.split()[-2:] == ["-", "-"] and "- size-1 dim: nothing to permute" in table
    row0 = next(line for line in table.splitlines() if line.startswith("0.weight"))
    assert row0.split("]", 1)[1].split() == ["0", "-", ".", "."]  # the single input channel
    plain = autoperm.trace(_mlp(), torch.randn(2, 4)).table()  # control: no size-1 dim, no legend line
    assert "size-1 dim" not in plain


# ----------------------------------------------------------------- 13, 17: the command line
def test_spec_per_head_lists_the_per_slot_groups(tmp_path, capsys):
    target = _write_factory(tmp_path, (
        "class M(nn.Module):\n"
        "    def __init__(s):\n"
        "        super().__init__(); s.inp = nn.Linear(8, 16); s.attn = nn.MultiheadAttention(16, 4, batch_first=True)\n"
        "    def forward(s, x):\n"
        "        h = s.inp(x)\n"
        "        return s.attn(h, h, h, need_weights=False)[0]\n"
        "def make():\n    return M()\n"))
    assert main(["spec", target, "--input-shape", "2,5,8", "--no-verify", "--per-head"]) == 0
    out = capsys.readouterr().out
    assert "Per slot (--per-head):" in out and "one per slot of" in out
    assert main(["spec", target, "--input-shape", "2,5,8", "--no-verify"]) == 0  # control: without the flag
    assert "Per slot" not in capsys.readouterr().out


def test_demo_rendering_hint_writes_the_svg_beside_the_dot(tmp_path, monkeypatch):
    import autoperm.api
    import autoperm.curve
    import autoperm.demo as demo
    import autoperm.merging

    class FakeCurve:
        def accuracy_barrier(self, key):
            return 0.0

    monkeypatch.setattr(demo, "_train", lambda seed, x, y, epochs, width: demo.DemoNet(2).eval())
    monkeypatch.setattr(demo, "_write_curves", lambda *a, **k: None)
    monkeypatch.setattr(autoperm.api, "trace", lambda model, x: PermutationSpec([]))
    monkeypatch.setattr(autoperm.merging, "match", lambda *a, **k: None)
    monkeypatch.setattr(autoperm.merging, "merge", lambda a, b, **k: a)
    monkeypatch.setattr(autoperm.curve, "interpolate", lambda *a, **k: FakeCurve())
    report = demo.run_demo(tmp_path / "d", epochs=1, width=2)
    assert f"dot -Tsvg {tmp_path / 'd' / 'spec.dot'} -o {tmp_path / 'd' / 'spec.svg'})" in report
    assert "-o spec.svg" not in report


# ----------------------------------------------------------------- 18: zoo.load arguments
@pytest.mark.parametrize("name, size, error, words", [
    ("torchvision:vit_b_16", 0, ValueError, r"load\(image_size=0\): pass a positive whole number"),
    ("torchvision:resnet18", "64", TypeError, r"load\(image_size='64'\)"),
    ("torchvision:resnet18", True, TypeError, r"load\(image_size=True\)"),
    (None, None, TypeError, r"load\(name=None\): pass a non-empty model name"),
    ("", None, ValueError, r"load\(name=''\)"),
])
def test_zoo_load_checks_its_arguments(name, size, error, words):
    with pytest.raises(error, match=words):
        autoperm.zoo.load(name, image_size=size)


def test_zoo_load_still_takes_a_good_image_size(tmp_path):
    (tmp_path / "cnn.py").write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(1, 2, 3))\n")
    _, (x,) = autoperm.zoo.load(f"{tmp_path / 'cnn.py'}:make", image_size=12)
    assert x.shape[1:] == (1, 12, 12)
    with pytest.raises(ValueError, match="image_size=-3"):  # control: the same call with a bad size
        autoperm.zoo.load(f"{tmp_path / 'cnn.py'}:make", image_size=-3)


def test_check_model_leaves_a_hand_written_spec_with_its_own_shapes_alone():
    """A hand-written spec listing only the tensors it moves worked with permute / merge before
    the unknown-tensor check; that check applies to compiled specs only (review finding)."""
    import copy as _copy

    from autoperm.spec import Axis, PermGroup, PermutationSpec

    torch.manual_seed(0)
    m = random_batchnorms(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval())
    axes = [Axis("0.weight", 0), Axis("0.bias", 0), Axis("1.weight", 0), Axis("1.bias", 0),
            Axis("1.running_mean", 0), Axis("1.running_var", 0), Axis("3.weight", 1)]
    shapes = {"0.weight": (8, 4), "0.bias": (8,), "1.weight": (8,), "1.bias": (8,), "1.running_mean": (8,),
              "1.running_var": (8,), "3.weight": (3, 8)}
    hand = PermutationSpec([PermGroup("h", 8, axes)], [], shapes)
    permuted = autoperm.permute(m, hand, autoperm.random_permutation(hand, 1, derangement=True))
    x = torch.randn(5, 4)
    assert torch.allclose(permuted(x), m(x), atol=1e-5)
    autoperm.merge(m, _copy.deepcopy(m), spec=hand)
    compiled = autoperm.trace(m, x)   # control: a compiled spec on a model with an extra tensor is refused
    bigger = nn.Sequential(*m, nn.Linear(3, 3)).eval()
    with pytest.raises(autoperm.ShapeMismatchError, match="'4.weight'"):
        compiled.check_model(bigger)
