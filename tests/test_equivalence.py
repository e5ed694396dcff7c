"""The core oracle: permuted model == model in float64, with every parameter and buffer perturbed;
and negative controls: permuting a single axis of a group must change the output."""

from __future__ import annotations

import random

import pytest
import torch

import autoperm
from helpers import float64_inputs, single_axis_spec
from zoo import ZOO

SEEDS = (0, 1, 2)
_SPECS: dict[str, autoperm.PermutationSpec] = {}


def _spec(name):
    if name not in _SPECS:
        factory, inputs = ZOO[name]
        _SPECS[name] = autoperm.trace(factory(), inputs(), verify=False)
    return _SPECS[name]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_permuted_model_is_equivalent(name):
    factory, inputs = ZOO[name]
    model = factory()
    spec = _spec(name)
    assert spec.groups, f"{name}: the compiled spec has no group at all"
    x = float64_inputs(inputs())
    for seed in SEEDS:
        m64 = autoperm.perturbed(model, seed)
        perms = autoperm.random_permutation(spec, seed, derangement=True)
        err = autoperm.check_equivalence(m64, spec, perms, x)
        assert err < 1e-9, f"{name} seed {seed}: permuted output differs by {err:.2e}"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_single_axis_permutation_changes_output(name):
    """Negative control: each sampled weight axis of a multi-axis group, permuted alone, changes the output.

    Axes on 1-D tensors are sampled only for groups without a weight axis: some biases are truly
    irrelevant (the key bias of attention shifts every score of a query equally).
    """
    factory, inputs = ZOO[name]
    spec = _spec(name)
    m64 = autoperm.perturbed(factory(), 0)
    x = float64_inputs(inputs())
    rng = random.Random(name)
    pairs = []
    for g in spec.groups:
        if len(g.axes) >= 2:
            weights = [a for a in g.axes if len(spec.shapes[a.tensor]) >= 2]
            pairs += [(g, a) for a in (weights or g.axes)]
    assert pairs, f"{name}: no group with two or more axes"
    for g, a in rng.sample(pairs, min(8, len(pairs))):
        sub = single_axis_spec(spec, g, a)
        perms = autoperm.random_permutation(sub, 3, derangement=True)
        err = autoperm.check_equivalence(m64, sub, perms, x)
        assert err > 1e-6, f"{name}: permuting only {a} of group {g.name!r} left the output unchanged"


@pytest.mark.parametrize("name", ["resnet20", "vit", "densenet"])
def test_verify_catches_a_broken_spec(name):
    """trace's check is not vacuous: dropping one axis from a group makes verify_spec fail by name."""
    factory, inputs = ZOO[name]
    spec = _spec(name)
    g = max(spec.groups, key=lambda g: len(g.axes))
    broken = autoperm.PermutationSpec(
        [autoperm.PermGroup(h.name, h.size, h.axes[1:] if h is g else h.axes) for h in spec.groups],
        [], dict(spec.shapes), dict(spec.tied))
    with pytest.raises(autoperm.UnsoundSpecError, match=g.name):
        autoperm.verify_spec(factory(), broken, inputs())


def test_every_zoo_model_verifies_inside_trace():
    factory, inputs = ZOO["resnet20"]
    spec = autoperm.trace(factory(), inputs())
    assert spec.meta["verify_error"] < 1e-9
