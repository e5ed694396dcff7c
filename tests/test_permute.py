"""permute(): errors name the group; the caller's model is untouched; invert / compose algebra."""

from __future__ import annotations

import pytest
import torch

import autoperm
from autoperm import PermutationError
from helpers import float64_inputs, state_snapshot
from zoo import ZOO


@pytest.fixture(scope="module")
def resnet():
    factory, inputs = ZOO["resnet20"]
    model = factory()
    return model, autoperm.trace(model, inputs(), verify=False), inputs()


def test_permute_returns_new_module_of_same_class(resnet):
    model, spec, x = resnet
    model = model.eval()
    out = autoperm.permute(model, spec, autoperm.random_permutation(spec, 1))
    assert type(out) is type(model) and out is not model
    assert torch.allclose(out(*x), model(*x), atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda p, g: p.pop(g), "no permutation given for group"),
    (lambda p, g: p.__setitem__("nope", torch.arange(3)), "unknown groups"),
    (lambda p, g: p.__setitem__(g, p[g][:-1]), "has length"),
    (lambda p, g: p.__setitem__(g, torch.zeros_like(p[g])), "is not a permutation"),
    (lambda p, g: p.__setitem__(g, p[g].float()), "1-D integer tensor"),
])
def test_bad_permutations_name_the_group(resnet, edit, message):
    model, spec, _ = resnet
    perms = autoperm.random_permutation(spec, 0)
    g = spec.groups[1].name
    edit(perms, g)
    with pytest.raises(PermutationError, match=message):
        autoperm.permute(model, spec, perms)


def test_callers_model_is_untouched(resnet):
    _, _, x = resnet
    factory, _ = ZOO["resnet20"]
    model = factory().train()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    before = state_snapshot(model)
    hooks = dict(model._forward_hooks)
    spec = autoperm.trace(model, x)
    autoperm.permute(model, spec, autoperm.random_permutation(spec, 0))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training is True
    assert dict(model._forward_hooks) == hooks
    assert all(m.training for m in model.modules())


def test_invert_and_compose(resnet):
    model, spec, x = resnet
    m64 = autoperm.perturbed(model, 0)
    x64 = float64_inputs(x)
    p, q = autoperm.random_permutation(spec, 1), autoperm.random_permutation(spec, 2)
    back = autoperm.permute(autoperm.permute(m64, spec, p), spec, autoperm.invert(p))
    assert all(torch.equal(back.state_dict()[k], m64.state_dict()[k]) for k in spec.shapes)
    two = autoperm.permute(autoperm.permute(m64, spec, p), spec, q)
    one = autoperm.permute(m64, spec, autoperm.compose(p, q))
    assert all(torch.equal(two.state_dict()[k], one.state_dict()[k]) for k in spec.shapes)
    assert torch.allclose(one(*x64), m64(*x64), atol=1e-10)


def test_random_permutation_is_seeded_and_derangements_have_no_fixed_point(resnet):
    _, spec, _ = resnet
    a, b = autoperm.random_permutation(spec, 5), autoperm.random_permutation(spec, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for seed in range(5):
        d = autoperm.random_permutation(spec, seed, derangement=True)
        for g in spec.groups:
            assert not (d[g.name] == torch.arange(g.size)).any()


def test_permuted_weights_are_moved_not_copied(resnet):
    """The permutation really moves weights (a vacuous permute would pass equivalence tests)."""
    model, spec, _ = resnet
    model = autoperm.perturbed(model, 0)  # distinct values everywhere, so any move shows
    out = autoperm.permute(model, spec, autoperm.random_permutation(spec, 0, derangement=True))
    moved = [k for k in spec.shapes if not torch.equal(out.state_dict()[k], model.state_dict()[k])]
    touched = {a.tensor for g in spec.groups for a in g.axes}
    assert set(moved) == touched
