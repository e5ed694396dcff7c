"""Regressions from a new-user trial: wrong alignments, two-input normalization, degenerate
statistics data, number-valued curves, data-free normalizations on the command line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoperm
from autoperm.cli import main


def _mlp(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, 3)).eval()


class TwoIn(nn.Module):
    def __init__(self, bn: bool = True):
        super().__init__()
        self.a, self.b = nn.Linear(10, 12), nn.Linear(6, 12)
        self.bn, self.o = nn.BatchNorm1d(12) if bn else nn.Identity(), nn.Linear(12, 3)

    def forward(self, x, y):
        return self.o(torch.relu(self.bn(self.a(x) + self.b(y))))


def test_alignment_of_other_models_is_refused():
    """merge(alignment=) with an alignment of width-8 models permuted only the first 8 of 16 rows."""
    a, b = _mlp(0), _mlp(1)
    other = autoperm.match(_mlp(2, 8), _mlp(3, 8))
    with pytest.raises(autoperm.ShapeMismatchError, match=r"alignment= was computed for other models.*'0.weight'"):
        autoperm.merge(a, b, alignment=other)
    with pytest.raises(autoperm.ShapeMismatchError, match=r"tensor '0\.(weight|bias)' has shape \[16.*\] in the state dict but \[8.*\] in the spec"):
        autoperm.permute_state_dict(b.state_dict(), other.spec, other.perms)
    own = autoperm.match(a, b)  # control: the alignment of these models is accepted
    x = torch.randn(4, 10)
    assert torch.allclose(autoperm.merge(a, b, alignment=own)(x), autoperm.merge(a, b)(x))


@pytest.mark.parametrize("norm", ["repair", "rescale", "reset", "regression"])
def test_normalization_of_a_two_input_model(norm):
    """normalize= fed each batch's second input as a target (StopIteration / missing argument).
    Oracle: merging a model with a permuted copy of itself, then normalizing, gives the model back."""
    torch.manual_seed(0)
    a = TwoIn(bn=norm == "reset").eval()  # with BatchNorm, repair / rescale reset it (tested elsewhere)
    if norm == "reset":
        with torch.no_grad():
            a.bn.running_mean.uniform_(-1, 1)
            a.bn.running_var.uniform_(0.5, 2)
    x = (torch.randn(64, 10), torch.randn(64, 6))
    spec = autoperm.trace(a, x)
    b = autoperm.permute(a, spec, autoperm.random_permutation(spec, 1, derangement=True))
    data = [x]
    if norm == "reset":  # reset recomputes BatchNorm statistics: compare with A reset on the same data
        a = autoperm.merge(a, a, method="identity", normalize="reset", data=data, example_inputs=x)
    merged = autoperm.merge(a, b, spec=spec, method="weight", normalize=norm, data=data, example_inputs=x)
    probe = (torch.randn(8, 10), torch.randn(8, 6))
    assert torch.allclose(merged(*probe), a(*probe), atol=1e-4)


@pytest.mark.parametrize("norm", ["repair", "reset"])
@pytest.mark.parametrize("case", ["one sample", "empty batch", "nan", "no batches"])
def test_statistics_data_that_cannot_give_statistics(norm, case):
    """One sample, a batch without rows or NaN inputs silently wrote zero or NaN weights."""
    a, b = _mlp(0), _mlp(1)
    if norm == "reset":
        a, b = (nn.Sequential(m[0], nn.BatchNorm1d(16), m[1], m[2]).eval() for m in (a, b))
    data = {"one sample": [torch.randn(1, 10)], "empty batch": [torch.randn(0, 10)],
            "nan": [torch.full((8, 10), float("nan"))], "no batches": []}[case]
    message = {"one sample": "at least 2 samples|more than one value per channel", "empty batch": "no rows", "nan": "non-finite",
               "no batches": "2 samples|no batches"}[case]
    with pytest.raises(ValueError, match=message):
        autoperm.merge(a, b, normalize=norm, data=data, example_inputs=torch.randn(2, 10))


def test_curve_of_a_number_valued_evaluate():
    """A curve of numbers stores them as 'value'; the barrier methods raised KeyError 'acc'."""
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(32, 10)
    curve = autoperm.interpolate(a, b, [0.0, 0.5, 1.0], lambda m: float(m(x).detach().square().mean()))
    vals = curve.series("value")
    assert curve.loss_barrier() == pytest.approx(max(0.0, vals[1] - (vals[0] + vals[2]) / 2))
    assert curve.accuracy_barrier() == pytest.approx(max(0.0, (vals[0] + vals[2]) / 2 - vals[1]))
    assert curve.loss_barrier() != curve.accuracy_barrier()  # one of them is positive
    with pytest.raises(ValueError, match="3 alphas but 2 values"):
        autoperm.loss_barrier([0, 0.5, 1], [1.0, 2.0])
    dict_curve = autoperm.interpolate(a, b, [0.0, 1.0], lambda m: {"acc": 1.0})
    with pytest.raises(KeyError, match="metric 'loss' is not in the curve"):
        dict_curve.loss_barrier()


@pytest.mark.parametrize("norm", ["bias_calibration", "bias_removal"])
def test_cli_data_free_normalization_needs_no_data(tmp_path, capsys, norm):
    """The CLI asked for --data for bias_calibration, which needs none."""
    model_file = tmp_path / "net.py"
    model_file.write_text("from torch import nn\n\ndef make():\n"
                          "    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))\n")
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"m{seed}.pt")
        torch.save(_mlp(seed).state_dict(), paths[-1])
    out = tmp_path / "merged.pt"
    assert main(["merge", str(paths[0]), str(paths[1]), "--model", f"{model_file}:make", "--input-shape", "2,10",
                 "--normalize", norm, "--out", str(out)]) == 0
    a, b = _mlp(0), _mlp(1)
    expected = autoperm.merge(a, b, normalize=norm, example_inputs=torch.randn(2, 10)).state_dict()
    got = torch.load(out, weights_only=True)
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(10, 16), nn.Linear(16, 4), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return {"cls": self.b(h), "reg": self.c(h)}


def test_preserve_first_every_layer_of_a_two_head_model_is_the_ensemble():
    """Only the l-th counted layer and its ancestors were preserved, so with two heads
    preserve_first >= L still merged the first head."""
    torch.manual_seed(0)
    a = TwoHeads().eval()
    torch.manual_seed(1)
    b = TwoHeads().eval()
    x, alpha = torch.randn(32, 10), 0.3
    ea, eb = a(x), b(x)
    for l, exact in ((1, ()), (2, ("cls",)), (3, ("cls", "reg")), (99, ("cls", "reg"))):
        out = autoperm.merge(a, b, alpha=alpha, preserve_first=l, example_inputs=x[:2])(x)
        for k in ("cls", "reg"):
            ens = (1 - alpha) * ea[k] + alpha * eb[k]
            err = float(((out[k] - ens).abs().max() / ens.abs().max()).detach())
            assert (err < 1e-5) == (k in exact), (l, k, err)


def test_data_given_as_one_tensor_and_guessed_inputs_get_clear_errors():
    """data=x (one Tensor) ran over its rows as unbatched samples; an input guessed for a
    two-input forward failed with a message about inputs the user never passed."""
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(ValueError, match=r"data= must be an iterable of batches.*pass \[x\]"):
        autoperm.merge(a, b, method="activation", data=torch.randn(64, 10))
    torch.manual_seed(0)
    two, two_b = TwoIn(bn=False).eval(), TwoIn(bn=False).eval()
    with pytest.raises(autoperm.ExampleInputError, match="guessed from the model's first layer: pass example_inputs="):
        autoperm.merge(two, two_b)


def test_alpha_from_numpy_or_a_tensor():
    """np.float32(0.3) and torch.tensor(0.3) were refused as 'not a finite number'."""
    np = pytest.importorskip("numpy")
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(4, 10)
    ref = autoperm.merge(a, b, alpha=0.25)(x)
    for alpha in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25)):
        assert torch.allclose(autoperm.merge(a, b, alpha=alpha)(x), ref)
    for bad in (float("nan"), torch.tensor([0.2, 0.3]), "0.5", True):
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            autoperm.merge(a, b, alpha=bad)


def test_spec_of_a_two_input_model_tells_merge_how_to_read_batches():
    """With spec= traced on two inputs and no example_inputs, merge read each batch's second
    tensor as a target and traced with one input."""
    torch.manual_seed(0)
    a, b = TwoIn(bn=False).eval(), TwoIn(bn=False).eval()
    x = (torch.randn(32, 10), torch.randn(32, 6))
    spec = autoperm.trace(a, x)
    assert spec.meta["inputs"] == 2
    assert autoperm.PermutationSpec.from_dict(spec.to_dict()).meta["inputs"] == 2
    for kw in (dict(method="activation"), dict(method="weight", normalize="repair")):
        got = autoperm.merge(a, b, spec=spec, data=[x], **kw)
        ref = autoperm.merge(a, b, spec=spec, data=[x], example_inputs=x, **kw)
        assert torch.allclose(got(*x), ref(*x), atol=1e-6)


@pytest.mark.parametrize("norm", ["repair", "reset"])
def test_partial_merge_of_a_two_input_model_normalizes(norm):
    """The partial merge's normalization read one input per batch, like merge's did. Oracle: the
    limit partial=0 equals the plain merge with the same normalization."""
    torch.manual_seed(0)
    a, b = TwoIn().eval(), TwoIn().eval()
    with torch.no_grad():  # statistics other than the defaults, so that a skipped reset shows
        for m in (a, b):
            m.bn.running_mean.uniform_(-1, 1)
            m.bn.running_var.uniform_(0.5, 2)
    x = (torch.randn(64, 10), torch.randn(64, 6))
    al = autoperm.match(a, b, method="activation", data=[x], example_inputs=x)
    full = autoperm.merge(a, b, alignment=al, normalize=norm, data=[x], example_inputs=x)
    zero = autoperm.merge(a, b, alignment=al, partial=0.0, normalize=norm, data=[x], example_inputs=x)
    wide = autoperm.merge(a, b, alignment=al, partial=0.5, normalize=norm, data=[x], example_inputs=x)
    probe = (torch.randn(8, 10), torch.randn(8, 6))
    assert torch.allclose(zero(*probe), full(*probe), atol=1e-5)
    assert torch.isfinite(wide(*probe)).all() and not torch.allclose(wide(*probe), full(*probe), atol=1e-3)


def test_emitted_module_keys_match_its_state_dict():
    """autoperm_keys listed num_batches_tracked entries the emitted graph dropped."""
    def cnn(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 16, 4)).eval()
    x = torch.randn(4, 3, 4, 4)
    for kw in (dict(partial=0.5), dict(preserve_first=1)):
        m = autoperm.merge(cnn(1), cnn(2), example_inputs=x, **kw)
        assert set(m.autoperm_keys) == set(m.state_dict()), kw


def test_dtype_mismatch_between_data_and_model_is_named():
    """float32 data= for a float64 model: the error said to pass a tuple for a forward with
    several arguments; it now names both dtypes and the cast."""
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    with pytest.raises(autoperm.ExampleInputError, match=r"the inputs are float32 and the model's parameters "
                                                         r"float64: cast"):
        autoperm.merge(model, model, method="activation", data=[torch.randn(8, 4)])
    with pytest.raises(autoperm.ExampleInputError, match="float32 and the model's parameters float64"):
        autoperm.match(model, model, method="activation", data=[torch.randn(8, 4).double()],
                       example_inputs=torch.randn(2, 4))


def test_a_failed_export_does_not_print_torchs_partial_graph(capsys, caplog):
    """A data-dependent branch: torch.export printed the partial graph to stderr (about four
    times, with the static-batch retry) before autoperm's one-line cause; it is now held back
    (logged at DEBUG) unless autoperm logs at DEBUG, and the TraceError still names the user's line."""
    import logging

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:
                h = h * 2
            return self.b(h)

    with pytest.raises(autoperm.TraceError, match=r"if h.sum\(\) > 0"):
        autoperm.trace(Branchy(), torch.randn(2, 4))
    assert "def forward" not in capsys.readouterr().err
    with caplog.at_level(logging.DEBUG, logger="autoperm"), pytest.raises(autoperm.TraceError):
        autoperm.trace(Branchy(), torch.randn(2, 4))
    assert "def forward" in capsys.readouterr().err   # debugging: torch's own output is shown


def test_models_of_different_classes_are_merged_with_a_warning(caplog):
    """Same tensors, another class: the result runs model_a's forward, so the user is told once."""
    import logging

    class Scaled(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    a, b0 = _mlp(0), _mlp(1)
    b = Scaled(*b0)
    with caplog.at_level(logging.WARNING, logger="autoperm"):
        merged = autoperm.merge(a, b)
    notes = [r.getMessage() for r in caplog.records if "forward" in r.getMessage()]
    assert len(notes) == 1, notes   # once: merge checks the pair once, and its matching does not again
    assert "model_a is a torch.nn.modules.container.Sequential" in notes[0] and "Scaled" in notes[0]
    assert type(merged) is nn.Sequential
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autoperm"):
        autoperm.merge(a, b0)
    assert not [r for r in caplog.records if "forward" in r.getMessage()]


def test_submodules_are_reachable_through_the_functions_that_shadow_their_packages():
    """autoperm.match / autoperm.merge are functions; the docs' autoperm.match.weight.last_profile
    and `import autoperm.match.hierarchical as h` failed with AttributeError / ImportError."""
    import importlib
    import inspect
    import sys

    import autoperm.match.hierarchical as h
    import autoperm.merge.repair as r

    assert h is sys.modules["autoperm.match.hierarchical"] and r is sys.modules["autoperm.merge.repair"]
    assert isinstance(autoperm.match.weight.last_profile, dict)
    assert autoperm.merge.staged is importlib.import_module("autoperm.merge.staged")
    assert inspect.isfunction(autoperm.match) and "model_b" in inspect.signature(autoperm.merge).parameters


def test_merge_and_merge_many_check_each_pair_once(monkeypatch):
    """merge checked the pair (a scan of every tensor for non-finite values), then its matching
    checked it again; merge_many checked every later model again in every round of re-alignment."""
    import autoperm.many as many
    import autoperm.merging as merging

    calls = []
    real = merging.check_compatible
    counting = lambda a, b, names=("model_a", "model_b"): calls.append(names) or real(a, b, names)  # noqa: E731
    monkeypatch.setattr(merging, "check_compatible", counting)
    monkeypatch.setattr(many, "check_compatible", counting)
    models = [_mlp(s) for s in range(3)]
    autoperm.merge(models[0], models[1])
    assert len(calls) == 1
    calls.clear()
    autoperm.merge_many(models, max_rounds=2)
    assert calls == [("models[0]", "models[1]"), ("models[0]", "models[2]")]
    calls.clear()
    autoperm.match(models[0], models[1])   # the public match still checks
    assert len(calls) == 1
    bad = _mlp(3, width=8)
    with pytest.raises(autoperm.SpecError, match="models\\[2\\]"):
        autoperm.merge_many([models[0], models[1], bad])
