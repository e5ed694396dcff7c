"""Merging more than two models: `merge_many`.

Every model is aligned to a common reference, then all are averaged with equal weights. The
reference is either the first model (``reference="first"``) or, by default, an iterated average
(``reference="average"``), the multi-model matching of Git Re-Basin (Ainsworth et al., section
"merging many models", summarized in ../papers/000 section 3 and ../papers/001 section 4): start
from every model aligned to the first; then, model by model, re-align the model to the average
of all the *others* (as they are aligned now), and repeat until a round changes no permutation
(at most ``max_rounds``). The average is finally expressed in the first model's own unit order
(every permutation composed with the inverse of the first model's), so the result is a module of
the first model's class whose units line up with the first model.

With two models there is nothing to iterate (the average of "the others" is one model), and
``merge_many([a, b])`` equals ``merge(a, b)`` with the same method and seed.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ._copy import copy_module
from .merge import average_states, check_compatible
from .match import NEEDS_GRAPH
from .merging import _reiterable, check_normalize, combine, match_compiled
from .permute import compose, identity_permutation, invert, permute_state_dict
from .spec import PermutationSpec

__all__ = ["merge_many"]

log = logging.getLogger(__name__)


def merge_many(models: Sequence[nn.Module], *, method: str = "weight", spec: PermutationSpec | None = None,
               data: Iterable | None = None, example_inputs: Any = None, normalize: str | None = None,
               loss_fn: Callable | None = None, seed: int = 0, reference: str = "average",
               max_rounds: int = 10, bias_layers: int | None = None, steps: int | None = None,
               lr: float | None = None, ridge: float | None = None) -> nn.Module:
    """A new module of ``models[0]``'s class: the equal-weight average of all models, each aligned
    to a common reference (module docstring). No model is modified.

    ``method``, ``data``, ``example_inputs``, ``loss_fn``, ``seed``, ``steps`` and ``lr`` are
    `autoperm.match`'s; ``normalize``, ``bias_layers`` and ``ridge`` are `autoperm.merge`'s, with the
    goal statistics of REPAIR / RESCALE (and the goal outputs of regression) the average of the
    aligned models' and bias calibration
    ``sum_i (1/n)^l b_i``. Example::

        merged = autoperm.merge_many([m1, m2, m3, m4])                     # weight matching
        merged = autoperm.merge_many(models, normalize="reset", data=loader)
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"merge_many needs at least two models, got {len(models)}")
    if reference not in ("average", "first"):
        raise ValueError(f"reference={reference!r}: choose 'average' (iterated, Git Re-Basin) or 'first'")
    if not isinstance(max_rounds, int) or max_rounds < 0:
        raise ValueError(f"max_rounds={max_rounds!r}: pass a non-negative integer")
    check_normalize(normalize, data, bias_layers, ridge)
    first = models[0]
    for i, m in enumerate(models[1:], 1):
        check_compatible(first, m, ("models[0]", f"models[{i}]"))
    data = _reiterable(data)
    # every pair below is checked above, or is built from checked models (the targets of _iterate)
    opts = dict(method=method, data=data, example_inputs=example_inputs, loss_fn=loss_fn, seed=seed,
                steps=steps, lr=lr, checked=True)
    al = match_compiled(first, models[1], spec, None, **opts)
    spec = al.spec
    # every later match has model_a = first or a copy of it with other weights: one export serves all
    compiled = (spec, al.traced, al.sites) if al.sites is not None and method in NEEDS_GRAPH else None
    perms = [identity_permutation(spec), al.perms] + [match_compiled(first, m, spec, compiled, **opts).perms
                                                      for m in models[2:]]
    states = [m.state_dict() for m in models]
    if reference == "average" and len(models) > 2:
        perms = _iterate(first, models, states, spec, perms, opts, max_rounds, compiled)
    aligned = [permute_state_dict(s, spec, p) for s, p in zip(states, perms)]
    weights = [1.0 / len(models)] * len(models)
    return combine(first, aligned, weights, al, normalize=normalize, data=data, example_inputs=example_inputs,
                   bias_layers=bias_layers, ridge=ridge, models=models)


def _iterate(first, models, states, spec, perms, opts, max_rounds, compiled=None):
    """Re-align each model to the average of the others until nothing changes; then express every
    permutation in the first model's frame."""
    aligned = [permute_state_dict(s, spec, p) for s, p in zip(states, perms)]
    target = copy_module(first)
    for rnd in range(max_rounds):
        changed = 0
        for i, model in enumerate(models):
            target.load_state_dict(average_states([s for j, s in enumerate(aligned) if j != i]))
            new = match_compiled(target, model, spec, compiled, **opts).perms
            if any(not torch.equal(new[g], perms[i][g]) for g in new):
                perms[i] = new
                aligned[i] = permute_state_dict(states[i], spec, new)
                changed += 1
        log.info("merge_many round %d: %d of %d models re-aligned", rnd + 1, changed, len(models))
        if not changed:
            break
    back = invert(perms[0], spec)
    return [compose(p, back, spec) for p in perms]
