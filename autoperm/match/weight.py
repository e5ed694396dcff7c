"""Weight matching: permutation coordinate descent (Git Re-Basin; the Git Bi-sect reproduction,
../papers/001, section 4.1.2, which also fixes the stopping rule: stop when a full pass over the
groups changes no permutation).

For one group, with every other permutation held fixed, the objective
``sum over tensors <W_A, P(W_B)>`` is linear in the group's permutation: its cost matrix
``C[i, j]`` sums, over the group's axes, the inner product of unit i of A with unit j of B (B's
other axes already permuted), so one linear assignment solves it exactly. Axis layouts are
honoured: after a flatten each unit is a block of ``inner`` slots, after a fused qkv the unit
repeats in each of ``outer`` slices, and all of those slots count.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..permute import apply_axis, unit_rows
from ..spec import Axis, PermGroup, PermutationSpec

__all__ = ["weight_matching", "unit_matrix", "solve_assignment"]

log = logging.getLogger(__name__)


def unit_matrix(t: torch.Tensor, axis: Axis, size: int) -> torch.Tensor:
    """The slots of ``axis`` in ``t`` as a ``(size, -1)`` matrix (`autoperm.permute.unit_rows`)."""
    return unit_rows(t, axis, size)


def solve_assignment(cost: torch.Tensor) -> torch.Tensor:
    """The permutation p maximizing ``sum_i cost[i, p[i]]`` (deterministic: scipy's LAP)."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy().astype(np.float64), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def _others_applied(t: torch.Tensor, tensor_axes, skip: Axis, perms) -> torch.Tensor:
    for group, ax in tensor_axes:
        if ax is not skip:
            t = apply_axis(t, ax, perms[group.name])
    return t


def _cost(group: PermGroup, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
          axes_by_tensor, perms, unknown: frozenset[str] = frozenset()) -> torch.Tensor:
    """The group's cost matrix; dims and factors where a group in ``unknown`` acts are summed out."""
    cost = None
    for ax in group.axes:
        others = [(h, x) for h, x in axes_by_tensor[ax.tensor] if h.name in unknown and h is not group]
        sum_dims = {x.dim for _, x in others if x.dim != ax.dim}
        sum_factors = any(x.dim == ax.dim for _, x in others)
        tb = _others_applied(b[ax.tensor], axes_by_tensor[ax.tensor], ax, perms)
        ua = unit_rows(a[ax.tensor], ax, group.size, sum_dims, sum_factors).double()
        ub = unit_rows(tb, ax, group.size, sum_dims, sum_factors).double()
        term = ua @ ub.T
        cost = term if cost is None else cost + term
    return cost


def _factor_sharing(spec: PermutationSpec) -> list[PermGroup]:
    """Groups that share a dim with another group on another factor (heads and head_dim)."""
    owners: dict[tuple[str, int], set[str]] = {}
    for g in spec.groups:
        for ax in g.axes:
            owners.setdefault((ax.tensor, ax.dim), set()).add(g.name)
    shared = {n for names in owners.values() if len(names) > 1 for n in names}
    return [g for g in spec.groups if g.name in shared and any(ax.outer > 1 or ax.inner > 1 for ax in g.axes)]


def weight_matching(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                    seed: int = 0, max_iter: int = 100, init: Mapping[str, torch.Tensor] | None = None,
                    progress=None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Permutations for ``b`` maximizing ``sum <A, P(B)>``, and the objective after each pass.

    Groups are visited in a random order per pass (``torch.Generator().manual_seed(seed)``).
    Two starts are run: from the identity, and a greedy one whose first pass solves each group
    with the dims of groups not visited yet summed out (their permutations are unknown, so
    their slots carry only noise); the better result is kept.
    Groups that share a dim on different factors (attention heads and head_dim, a grouped conv's
    group index and within-group units) trap plain coordinate descent: with head_dim wrong, no
    head assignment scores well. So after a first descent those groups are re-solved with a cost
    that sums out the dim's other factors (invariant to the other group), and the descent is run
    again from there; the better of the two results is kept.
    """
    axes_by_tensor: dict[str, list] = {}
    for g in spec.groups:
        for ax in g.axes:
            axes_by_tensor.setdefault(ax.tensor, []).append((g, ax))
    start = {g.name: (init[g.name].clone() if init else torch.arange(g.size)) for g in spec.groups}
    perms, history = _descent(spec, a, b, axes_by_tensor, start, seed, max_iter, progress)
    if init is None:  # a second start whose first pass ignores what is not solved yet
        perms2, history2 = _descent(spec, a, b, axes_by_tensor, start, seed, max_iter, progress, True)
        if history2[-1] > history[-1]:
            perms, history = perms2, history + history2
    sharing = _factor_sharing(spec)
    if sharing:
        restart = dict(perms)
        for g in sorted(sharing, key=lambda g: min(ax.inner for ax in g.axes)):
            others = frozenset(h.name for h in sharing if h is not g)
            restart[g.name] = solve_assignment(_cost(g, a, b, axes_by_tensor, restart, others))
        perms2, history2 = _descent(spec, a, b, axes_by_tensor, restart, seed + 1, max_iter, progress)
        if history2 and history2[-1] > history[-1]:
            perms, history = perms2, history + history2
    return perms, history


def _descent(spec, a, b, axes_by_tensor, start, seed, max_iter, progress, first_pass_invariant=False):
    """Coordinate descent; with ``first_pass_invariant`` the first pass solves each group with the
    dims of groups not visited yet summed out (their permutations are still unknown)."""
    gen = torch.Generator().manual_seed(int(seed))
    perms = dict(start)
    history: list[float] = []
    unknown = {g.name for g in spec.groups} if first_pass_invariant else set()
    for it in range(max_iter):
        changed = False
        for gi in torch.randperm(len(spec.groups), generator=gen).tolist():
            g = spec.groups[gi]
            unknown.discard(g.name)
            cost = _cost(g, a, b, axes_by_tensor, perms, frozenset(unknown))
            new = solve_assignment(cost)
            idx = torch.arange(g.size)
            gain = (cost[idx, new].sum() - cost[idx, perms[g.name]].sum()).item()
            if gain > 1e-12 * max(1.0, abs(cost[idx, new].sum().item())) and not torch.equal(new, perms[g.name]):
                perms[g.name] = new
                changed = True
        history.append(_objective(spec, a, b, perms))
        log.info("weight matching pass %d: objective %.6g", it + 1, history[-1])
        if progress is not None:
            progress(it + 1, history[-1])
        if not changed:
            break
    return perms, history


def _objective(spec: PermutationSpec, a, b, perms) -> float:
    """``sum over permuted tensors of <A, P(B)>``."""
    from ..permute import permute_state_dict

    pb = permute_state_dict(b, spec, perms)
    tensors = {ax.tensor for g in spec.groups for ax in g.axes}
    return float(sum((a[t].double() * pb[t].double()).sum().item() for t in tensors))
