"""Regressions from the seventh new-user trial (checks and argument errors): verify_spec /
check_equivalence passed vacuously on an empty batch, check_equivalence ran the caller's model in
training mode (BatchNorm statistics updated, dropout on: 0.79 for a sound spec), meta-device models
crashed deep in torch, wrong argument types gave raw Python errors, a hand-written spec that failed
verification was blamed on "a bug in a permutation rule", a failing VerifyReport was truthy, and
bad inputs to verify_spec / diagnose gave raw or misworded errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autoperm
from autoperm import Axis, PermGroup, PermutationSpec
from autoperm.verify import verify_compiled


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def _shapes(m: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _sound(m: nn.Module) -> PermutationSpec:
    axes = [Axis("0.weight", 0), Axis("0.bias", 0), Axis("2.weight", 1)]
    return PermutationSpec([PermGroup("hidden", 6, axes)], [], _shapes(m))


def _unsound(m: nn.Module) -> PermutationSpec:
    """The hidden group without the bias and the next layer's input dim."""
    return PermutationSpec([PermGroup("hidden", 6, [Axis("0.weight", 0)])], [], _shapes(m))


def test_checks_refuse_an_empty_batch():
    m = _mlp()
    bad = _unsound(m)
    perms = autoperm.random_permutation(bad, derangement=True)
    with pytest.raises(autoperm.ExampleInputError, match=r"inputs= has batch size 0 .*\(0, 4\).*at least one"):
        autoperm.verify_spec(m, bad, torch.randn(0, 4), raise_on_failure=False)
    with pytest.raises(autoperm.ExampleInputError, match=r"inputs= has batch size 0"):
        autoperm.check_equivalence(m, bad, perms, (torch.randn(0, 4),))
    # negative control: one example is enough to catch the unsound spec
    assert autoperm.verify_spec(m, bad, torch.randn(1, 4), raise_on_failure=False).error > 1e-3
    assert autoperm.check_equivalence(m, bad, perms, torch.randn(2, 4)) > 1e-3


def test_check_equivalence_runs_an_eval_copy_and_leaves_the_model_alone():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    hidden = [Axis(k, 0) for k in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var")]
    spec = PermutationSpec([PermGroup("h", 16, hidden + [Axis("4.weight", 1)])], [], _shapes(m))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(8, 4)
    err = autoperm.check_equivalence(m, spec, autoperm.random_permutation(spec, 0, derangement=True), x)
    assert err < 1e-5
    assert m.training and all(mod.training for mod in m.modules())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # num_batches_tracked stays 0
    # negative control: a spec that leaves out the running mean is caught on the same model
    broken = PermutationSpec([PermGroup("h", 16, [a for a in hidden if a.tensor != "1.running_mean"]
                                        + [Axis("4.weight", 1)])], [], _shapes(m))
    assert autoperm.check_equivalence(m, broken, autoperm.random_permutation(broken, 0, derangement=True), x) > 1e-3


def test_meta_device_models_are_refused_at_the_entry_point():
    with torch.device("meta"):
        a, b = _mlp(), _mlp()
    for call in (lambda: autoperm.trace(a, torch.randn(2, 4)),
                 lambda: autoperm.merge(a, b, example_inputs=torch.randn(2, 4)),
                 lambda: autoperm.verify_spec(a, _sound(a), torch.randn(2, 4))):
        with pytest.raises(autoperm.TraceError, match=r"'0\.weight' is on the meta device.*to_empty\(device='cpu'\)"):
            call()
    with pytest.raises(autoperm.TraceError, match="model_a's parameter"):
        autoperm.merge(a, b)
    real = _mlp()
    with pytest.raises(autoperm.ExampleInputError, match="example_inputs= holds tensors on the meta device"):
        autoperm.trace(real, torch.randn(2, 4, device="meta"))
    # negative control: the materialized model merges
    a.to_empty(device="cpu").load_state_dict(real.state_dict())
    b.to_empty(device="cpu").load_state_dict(_mlp(1).state_dict())
    assert isinstance(autoperm.merge(a, b, spec=_sound(real)), nn.Sequential)


def _calls():
    m = _mlp()
    spec, x = _sound(m), torch.randn(2, 4)
    perms = autoperm.random_permutation(spec)
    return {
        "trace seed": (lambda: autoperm.trace(m, x, seed="a"), ValueError, "seed='a': pass an integer"),
        "trace verify": (lambda: autoperm.trace(m, x, verify="yes"), TypeError, "verify='yes': pass True or False"),
        "random_permutation seed": (lambda: autoperm.random_permutation(spec, "a"), ValueError, "seed='a'"),
        "random_permutation model": (lambda: autoperm.random_permutation(m), TypeError,
                                     "spec must be an autoperm.PermutationSpec, got Sequential.*autoperm.trace"),
        "permute None": (lambda: autoperm.permute(m, spec, None), TypeError, "perms must be a dict.*got NoneType"),
        "permute swapped": (lambda: autoperm.permute(m, perms, spec), TypeError,
                            r"spec must be .*got dict.*permute\(model, spec, perms\)"),
        "verify_spec None": (lambda: autoperm.verify_spec(m, None, x), TypeError, "spec must be .*got NoneType"),
        "merge path": (lambda: autoperm.merge(m, m, spec="spec.json"), TypeError,
                       r"spec must be .*got str \('spec.json'\).*PermutationSpec.load\(path, model\)"),
        "interpolate alpha": (lambda: autoperm.interpolate(m, m, 0.5, lambda mm: 1.0, spec=spec), TypeError,
                              "alphas must be a sequence of numbers, .* got float"),
        "interpolate evaluate": (lambda: autoperm.interpolate(m, m, [0, 1], lambda mm: "x", spec=spec), TypeError,
                                 "evaluate must return a number .* returned str"),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_wrong_argument_types_name_the_parameter(name):
    call, kind, words = _calls()[name]
    with pytest.raises(kind, match=words):
        call()


def test_interpolate_takes_tensor_alphas_and_the_good_calls_run():
    m, b = _mlp(), _mlp(1)
    spec, x = _sound(m), torch.randn(2, 4)
    curve = autoperm.interpolate(m, b, torch.linspace(0, 1, 3), lambda mm: torch.tensor(1.5), spec=spec)
    assert curve.alphas == [0.0, 0.5, 1.0] and curve.series("value") == [1.5, 1.5, 1.5]
    # negative controls for the parametrized refusals: the well-typed calls work
    perms = autoperm.random_permutation(spec, 3)
    assert torch.allclose(autoperm.permute(m, spec, perms)(x), m(x), atol=1e-6)
    assert autoperm.verify_spec(m, spec, x).ok


def test_a_users_spec_that_fails_is_not_blamed_on_a_rule():
    m, x = _mlp(), torch.randn(4, 4)
    report = autoperm.verify_spec(m, _unsound(m), x, raise_on_failure=False)
    assert not report.ok and not report and set(report.failing) == {"hidden"}
    with pytest.raises(autoperm.UnsoundSpecError) as info:
        autoperm.verify_spec(m, _unsound(m), x)
    msg = str(info.value)
    assert "'hidden'" in msg and "too few tensors" in msg and "bug in a permutation rule" not in msg
    # a spec autoperm has just compiled (trace, merge) is a rule's fault, and says so
    with pytest.raises(autoperm.UnsoundSpecError, match="bug in a permutation rule"):
        verify_compiled(m, _unsound(m), (x,))
    # negative control: a sound spec gives an ok, truthy report
    good = autoperm.verify_spec(m, _sound(m), x)
    assert good.ok and good and good.error <= good.tolerance


@pytest.mark.parametrize("tol, kind", [(-1, ValueError), (0, ValueError), (math.inf, ValueError),
                                       (math.nan, ValueError), ("1e-7", TypeError), (True, TypeError)])
def test_tolerance_must_be_a_positive_number(tol, kind):
    m = _mlp()
    with pytest.raises(kind, match="tolerance="):
        autoperm.verify_spec(m, _sound(m), torch.randn(2, 4), tolerance=tol)
    assert autoperm.verify_spec(m, _sound(m), torch.randn(2, 4), tolerance=1e-9).ok  # control


def test_bad_inputs_are_example_input_errors_naming_the_argument():
    m, spec = _mlp(), _sound(_mlp())
    for call in (lambda: autoperm.verify_spec(m, spec, torch.randn(2, 5)),
                 lambda: autoperm.check_equivalence(m, spec, autoperm.random_permutation(spec), torch.randn(2, 5))):
        with pytest.raises(autoperm.ExampleInputError, match=r"called on inputs= \(shapes \[\(2, 5\)\]\)") as info:
            call()
        assert isinstance(info.value.__cause__, RuntimeError)
    a, b = _mlp(1), _mlp(2)
    first = "merged raised when called on the first batch of data="
    with pytest.raises(autoperm.ExampleInputError, match=first) as info:
        autoperm.diagnose(a, [a, b], [torch.randn(10, 5)])
    assert "example inputs" not in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(autoperm.ExampleInputError, match="batch 1 of data="):
        autoperm.diagnose(a, [a, b], [torch.randn(10, 4), torch.randn(10, 5)])
    # negative control: good data diagnoses (a model against itself: ratios 1)
    d = autoperm.diagnose(a, [a, a], [torch.randn(10, 4)])
    assert all(abs(r.variance_ratio - 1) < 1e-6 for r in d.rows)
