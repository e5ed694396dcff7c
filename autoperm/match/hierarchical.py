"""Per-head refinement of child groups (`autoperm.spec.PermGroup.parent`) after a matcher ran.

Matchers solve a child group (head_dim) as one permutation shared by every head. When the spec
has children, `refine_children` then lines up each head's head_dim on its own: B is permuted by
the first answer, each child is split into one plain group per parent slot (`expand_children`;
the parents stay fixed), and the same matcher runs again on that plain spec: weight matching
over every group (it starts from the first answer, so the objective can only grow), activation
matching over the per-head groups. The answers compose into one ``[heads, head_dim]``
permutation per child: ``child[h] = first[second_h]``, in the order `autoperm.permute` applies
(parent first).

Example::

    spec = autoperm.trace(model_a, x, hierarchical=True)
    al = autoperm.match(model_a, model_b, spec, method="weight")
    al.perms[child].shape   # (heads, head_dim)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

import torch

from ..analysis import Site
from ..errors import SpecError
from ..permute import compose, invert, permute_state_dict
from ..spec import Axis, PermGroup, PermutationSpec, chunks_by_parent, slot_coordinates

__all__ = ["has_children", "expand_children", "expand_sites", "refine_children", "refine_weight", "absorb_children",
           "REFINED"]

log = logging.getLogger(__name__)

REFINED = ("weight", "activation")  # matchers refined per head after their run (STE: in every projection)


def has_children(spec: PermutationSpec | None) -> bool:
    return spec is not None and any(g.parent for g in spec.groups)


def _slot_name(child: str, h: int) -> str:
    return f"{child}[{h}]"


def expand_children(spec: PermutationSpec, keep_others: bool = True) -> PermutationSpec:
    """A plain spec: each child split into one group per parent slot (named ``child[h]``, acting
    on that slot's chunk of every child axis), the parents left out (held fixed); the other
    groups kept with ``keep_others``."""
    parents = {g.parent for g in spec.groups if g.parent}
    groups: list[PermGroup] = []
    for g in spec.groups:
        if g.parent is None:
            if keep_others and g.name not in parents:
                groups.append(PermGroup(g.name, g.size, list(g.axes)))
            continue
        m = spec.group(g.parent).size
        for h in range(m):
            axes = []
            for a in g.axes:
                chunk = a.outer // m
                axes.append(Axis(a.tensor, a.dim, a.offset + h * chunk * g.size * a.inner, chunk, a.inner))
            groups.append(PermGroup(_slot_name(g.name, h), g.size, axes))
    return PermutationSpec(groups, list(spec.frozen), dict(spec.shapes), {k: list(v) for k, v in spec.tied.items()},
                           dict(spec.meta)).validate()


def expand_sites(spec: PermutationSpec, sites: Mapping[str, list[Site]]) -> dict[str, list[Site]]:
    """Activation sites of `expand_children`'s per-slot groups: a child's sites whose outer chunk
    ``k // (outer / parent.size)`` is parent slot ``k`` there too (checked against the parent's
    sites on the same value, as `autoperm.spec` checks parameters); others (a ``(tokens, heads,
    head_dim)`` flattening, whose chunks cycle through the heads) are left out."""
    out: dict[str, list[Site]] = {}
    for g in spec.groups:
        if g.parent is None:
            continue
        m = spec.group(g.parent).size
        for s in sites.get(g.name, []):
            if s.outer % m or not _chunked_by_parent(s, g.size, m, sites.get(g.parent, [])):
                continue
            chunk = s.outer // m
            for h in range(m):
                out.setdefault(_slot_name(g.name, h), []).append(
                    dataclasses.replace(s, offset=s.offset + h * chunk * g.size * s.inner, outer=chunk))
    return out


def _chunked_by_parent(s: Site, size: int, m: int, parent_sites: list[Site]) -> bool:
    same = [(p.offset, p.outer, p.inner) for p in parent_sites if p.node == s.node and p.dim == s.dim]
    try:
        coord = slot_coordinates(same, m, s.offset + s.outer * size * s.inner)
    except SpecError:
        return False
    return bool(same) and chunks_by_parent(coord, s.offset, s.outer, size, s.inner, m)


def _compose(spec: PermutationSpec, first: Mapping[str, torch.Tensor],
             second: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``first`` then the refinement ``second`` (keyed by `expand_children`'s names; parents and
    groups it left out stay in place)."""
    step = {}
    for g in spec.groups:
        if g.parent is not None:
            step[g.name] = torch.stack([second.get(_slot_name(g.name, h), torch.arange(g.size))
                                        for h in range(spec.group(g.parent).size)])
        else:
            step[g.name] = second.get(g.name, torch.arange(g.size))
    return compose(first, step, spec)


def refine_children(method: str, ctx, perms: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``perms`` with each child refined per parent slot (module docstring), and the second
    run's history. ``ctx`` is the `autoperm.match.MatchContext` the first run used."""
    from . import activation_matching

    spec = ctx.spec
    if method == "weight":
        return refine_weight(spec, ctx.state_a, ctx.state_b, perms, seed=ctx.seed, max_iter=ctx.max_iter, tol=ctx.tol)
    sites = expand_sites(spec, ctx.sites or {})
    if not sites:
        log.info("per-head refinement: no activation site lays out the heads; children stay shared")
        return perms, []
    state_b1 = permute_state_dict(ctx.state_b, spec, perms)
    second, history = activation_matching(expand_children(spec, keep_others=False), ctx.traced, sites,
                                          ctx.state_a, state_b1, ctx.data, features=ctx.features,
                                          n_inputs=ctx.n_inputs)
    _log_moved(method, second)
    return _compose(spec, perms, second), history


def refine_weight(spec: PermutationSpec, state_a, state_b, perms: dict[str, torch.Tensor], *, seed: int = 0,
                  max_iter: int = 100, tol: float | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Weight matching's per-head refinement: B permuted by ``perms``, then one coordinate
    descent over `expand_children`'s plain spec from there (the objective can only grow)."""
    from .weight import weight_matching

    state_b1 = permute_state_dict(state_b, spec, perms)
    extra = {"tol": tol} if tol is not None else {}
    second, history = weight_matching(expand_children(spec), state_a, state_b1, seed=seed, max_iter=max_iter,
                                      starts=1, **extra)
    _log_moved("weight", second)
    return _compose(spec, perms, second), history


def _log_moved(method: str, second: Mapping[str, torch.Tensor]) -> None:
    moved = sum(int(not torch.equal(p, torch.arange(p.numel()))) for p in second.values())
    log.info("per-head refinement (%s): %d of %d groups moved", method, moved, len(second))


def absorb_children(spec: PermutationSpec, state_b: Mapping[str, torch.Tensor],
                    perms: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(state_b2, flat)`` with ``flat`` holding only 1-D permutations (children at the identity)
    and ``permute(B2, flat) == permute(B, perms)``: B2 is B with each child's rows applied in
    B's own head order (``row[j] = child[parent_inverse[j]]``), the same function as B. For back
    ends that take one permutation per group (partial merging)."""
    pre, flat = {}, dict(perms)
    for g in spec.groups:
        p = perms[g.name]
        if g.parent is None or p.dim() == 1:
            pre[g.name] = torch.arange(g.size)
            continue
        pre[g.name] = p[invert({g.parent: perms[g.parent]})[g.parent].to(p.device)]
        flat[g.name] = torch.arange(g.size)
    return permute_state_dict(state_b, spec, pre), flat
