"""Shared test helpers: canonical partitions and single-axis negative controls."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm.spec import Axis, PermGroup, PermutationSpec


def canonical(spec: PermutationSpec) -> set[frozenset]:
    """Groups as a set of frozensets of (tensor, dim, offset, outer, inner): names ignored."""
    return {frozenset((a.tensor, a.dim, a.offset, a.outer, a.inner) for a in g.axes) for g in spec.groups}


def single_axis_spec(spec: PermutationSpec, group: PermGroup, axis: Axis) -> PermutationSpec:
    """A spec with one group holding only ``axis``: permuting it alone breaks the coupling."""
    return PermutationSpec([PermGroup(group.name, group.size, [axis])], [], dict(spec.shapes), dict(spec.tied))


def rel_change(model, spec, perms, inputs) -> float:
    return autoperm.check_equivalence(model, spec, perms, inputs)


def float64_inputs(inputs):
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_mlps(seeds):
    """Small MLPs (8 -> 16 -> 16 -> 4) trained, one per seed, on one synthetic 4-class problem;
    returns the models (eval mode) and the inputs and labels ``x``, ``y``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 4, generator=g)).argmax(1)
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        models.append(m.eval())
    return models, x, y


def random_batchnorms(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm's running statistics, weight and bias drawn at random (in
    place): default zeros and ones would hide a fit that ignores a BatchNorm's shift or scale."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model
