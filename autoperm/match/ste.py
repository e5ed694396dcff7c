"""The straight-through estimator (STE) of Git Re-Basin (Ainsworth et al., Algorithm 3; the Git
Bi-sect reproduction, ../papers/001, section 4.1.3, implements it with functional calls, as here;
the Distill-and-Merge thesis, ../papers/000, section 3, summarizes re-basin).

Learned weights ``W`` (initialized to model A's) stand in for model B. Each step:

1. project: ``P = weight_matching(W, B)``, the permutation of B nearest to ``W``
   (`autoperm.match.weight.weight_matching`, warm-started from the previous ``P``);
2. forward the midpoint model ``(A + P(B)) / 2`` on one batch, but with the straight-through
   trick ``W + (P(B) - W).detach()`` in place of ``P(B)``: the value is the projected weights,
   the gradient goes to ``W``;
3. one Adam step on ``W`` with the midpoint loss ``loss_fn(outputs, target)``.

The answer is the projection of the final ``W``. With a hierarchical spec each projection also
refines the head_dim permutations per head (`autoperm.match.hierarchical.refine_weight`). Only
the float tensors the spec touches are learned; the others are interpolated as they are. The forward runs with
``torch.func.functional_call`` on a copy of model A (`autoperm.match._loss.MidpointLoss`).

Example::

    al = autoperm.match(model_a, model_b, method="ste", data=loader,
                        loss_fn=torch.nn.functional.cross_entropy, steps=200, lr=1e-3)
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from ..permute import permute_state_dict
from ..spec import PermutationSpec
from ._loss import check_budget, descend, touched_float_keys
from .hierarchical import has_children, refine_weight
from .weight import weight_matching

__all__ = ["ste_matching"]

log = logging.getLogger(__name__)


def ste_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                 objective, *, steps: int = 100, lr: float = 1e-3, seed: int = 0,
                 max_iter: int = 100) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Permutations for ``state_b`` learned by the straight-through estimator (module docstring).

    ``objective(aligned_b, step) -> scalar`` is the midpoint loss
    (`autoperm.match._loss.MidpointLoss`). Returns the permutations and the loss per step.
    """
    check_budget(steps, lr)
    a = {k: v.detach() for k, v in state_a.items()}
    b = {k: v.detach() for k, v in state_b.items()}
    learned = {k: a[k].clone().requires_grad_(True) for k in touched_float_keys(spec, b)}
    flat = None  # the last projection before its per-head refinement (warm start of the next)

    def project(init):
        nonlocal flat
        target = dict(a)
        target.update({k: w.detach() for k, w in learned.items()})
        flat = weight_matching(spec, target, b, seed=seed, max_iter=max_iter, init=init)[0]
        if not has_children(spec):
            return flat
        return refine_weight(spec, target, b, flat, seed=seed, max_iter=max_iter)[0]

    def value_at(step):
        perms = project(flat)
        hard = permute_state_dict(b, spec, perms)
        through = dict(hard)
        for k, w in learned.items():
            through[k] = w + (hard[k] - w).detach()
        return objective(through, step)

    history = descend(list(learned.values()), value_at, steps=steps, lr=lr, log=log, desc="ste",
                      what="midpoint loss")
    return project(flat), history
