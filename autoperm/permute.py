"""The permute back end: random permutations, applying them, inverting and composing them.

A permutation ``p`` (a LongTensor holding each of ``0..n-1`` once) acts by gather:
``new[i] = old[p[i]]`` along each slot block of its group (`autoperm.spec.Axis`). A child group
(`autoperm.spec.PermGroup.parent`) may instead hold one row per parent slot (``[m, k]``), applied
after the parent: ``new[h, i] = old[parent[h], child[h, i]]``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping

import torch
from torch import nn

from ._args import check_bool, check_module, check_seed, check_spec
from ._copy import copy_with_state
from .errors import PermutationError, ShapeMismatchError
from .spec import Axis, PermutationSpec

__all__ = ["random_permutation", "permute", "permute_state_dict", "apply_axis", "invert", "compose",
           "identity_permutation", "check_permutations", "unit_rows"]

Perms = dict[str, torch.Tensor]


def identity_permutation(spec: PermutationSpec) -> Perms:
    """The identity permutation of every group."""
    return {g.name: torch.arange(g.size) for g in spec.groups}


def random_permutation(spec: PermutationSpec, seed: int = 0, *, derangement: bool = False) -> Perms:
    """A random permutation per group, from ``torch.Generator().manual_seed(seed)``.

    With ``derangement=True`` no unit stays in place (for groups of size >= 2), which makes
    checks meaningful: a random permutation of size 2 is the identity half the time. A child
    group gets one permutation per parent slot (``[parent.size, size]``).

    Example::

        perms = random_permutation(spec, seed=0)   # {'fc1': tensor([3, 0, 2, 1, ...]), ...}
    """
    check_spec(spec, call="random_permutation(spec, seed)")
    gen = torch.Generator().manual_seed(check_seed(seed))
    check_bool(derangement, "derangement")
    out: Perms = {}
    rows = {g.name: spec.group(g.parent).size if g.parent else 0 for g in spec.groups}
    for g in spec.groups:
        ps = [_one_random(g.size, gen, derangement) for _ in range(max(rows[g.name], 1))]
        out[g.name] = torch.stack(ps) if rows[g.name] else ps[0]
    return out


def _one_random(n: int, gen: torch.Generator, derangement: bool) -> torch.Tensor:
    if derangement and n >= 2:
        shift = torch.randperm(n, generator=gen)
        # a cyclic shift of a random ordering has no fixed point
        p = torch.empty(n, dtype=torch.long)
        p[shift] = shift.roll(1)
        return p
    return torch.randperm(n, generator=gen)


def check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    """Raise `PermutationError` naming the group if ``perms`` is missing, extra or invalid (a
    TypeError if ``perms`` is not a mapping)."""
    if not isinstance(perms, Mapping):
        raise TypeError(f"perms must be a dict {{group name: LongTensor}}, e.g. autoperm.random_permutation(spec) or "
                        f"autoperm.match(model_a, model_b).perms; got {type(perms).__name__}")
    names = {g.name for g in spec.groups}
    extra = sorted(set(perms) - names)
    if extra:
        raise PermutationError(f"permutations given for unknown groups {extra}; the spec's groups are "
                               f"{sorted(names)}")
    for g in spec.groups:
        if g.name not in perms:
            raise PermutationError(f"no permutation given for group {g.name!r} (size {g.size}); pass one "
                                   "for every group, e.g. from autoperm.identity_permutation(spec)")
        p = perms[g.name]
        rows = spec.group(g.parent).size if g.parent else None
        two_d = rows is not None and isinstance(p, torch.Tensor) and p.dim() == 2
        if not isinstance(p, torch.Tensor) or p.dim() != (2 if two_d else 1) or p.dtype not in (torch.int64, torch.int32):
            shape = f"1-D (or [{rows}, {g.size}]: one row per slot of parent {g.parent!r})" if rows else "1-D"
            raise PermutationError(f"permutation of group {g.name!r} must be a {shape} integer tensor")
        if p.shape[-1] != g.size or (two_d and p.shape[0] != rows):
            got = f"shape {list(p.shape)}" if two_d else f"length {p.numel()}"
            raise PermutationError(f"permutation of group {g.name!r} has {got}, the group has size {g.size}"
                                   + (f" and {rows} parent slots" if two_d else ""))
        if not torch.equal(torch.sort(p.cpu(), dim=-1).values, torch.arange(g.size).expand_as(p)):
            raise PermutationError(f"permutation of group {g.name!r} is not a permutation of 0..{g.size - 1}"
                                   + (" in every row" if two_d else ""))


def apply_axis(t: torch.Tensor, axis: Axis, perm: torch.Tensor) -> torch.Tensor:
    """``t`` with the slots of ``axis`` gathered by ``perm`` (a new tensor). A 2-D ``perm``
    (``[m, size]``, a child group's row per parent slot) gathers outer chunk ``h`` by row ``h``."""
    size = perm.shape[-1]
    n = axis.extent(size)
    dim = axis.dim
    block = t.narrow(dim, axis.offset, n)
    shape = list(t.shape)
    view = block.reshape(shape[:dim] + [axis.outer, size, axis.inner] + shape[dim + 1:])
    if perm.dim() == 2:
        rows = perm.to(t.device).repeat_interleave(axis.outer // perm.shape[0], dim=0)  # [outer, size]
        index = rows.view([1] * dim + [axis.outer, size, 1] + [1] * (len(shape) - dim - 1)).expand_as(view)
        moved = view.gather(dim + 1, index).reshape(block.shape)
    else:
        moved = view.index_select(dim + 1, perm.to(t.device)).reshape(block.shape)
    if n == t.shape[dim]:
        return moved
    pieces = [t.narrow(dim, 0, axis.offset), moved,
              t.narrow(dim, axis.offset + n, t.shape[dim] - axis.offset - n)]
    return torch.cat(pieces, dim)


def unit_rows(t: torch.Tensor, axis: Axis, size: int, sum_dims: Iterable[int] = (),
              sum_factors: bool = False) -> torch.Tensor:
    """The slots of ``axis`` in ``t`` as a ``(size, -1)`` matrix: row i is everything unit i owns.

    ``sum_dims`` (other dims of ``t``) and, with ``sum_factors``, the axis's own ``outer`` and
    ``inner`` factors are summed out first: the rows then do not depend on permutations acting
    there (heads vs head_dim, or groups whose permutation is not known yet).
    """
    block = t.narrow(axis.dim, axis.offset, axis.extent(size))
    shape = list(t.shape)
    view = block.reshape(shape[:axis.dim] + [axis.outer, size, axis.inner] + shape[axis.dim + 1:])
    drop = [k if k < axis.dim else k + 2 for k in sum_dims]
    if sum_factors:
        drop += [axis.dim, axis.dim + 2]
    if drop:
        view = view.sum(dim=tuple(drop), keepdim=True)
    return view.movedim(axis.dim + 1, 0).reshape(size, -1)


def permute_state_dict(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every axis of ``spec`` permuted; tied aliases follow their tensor.
    A tensor of the spec that ``state`` holds with another shape raises `ShapeMismatchError`."""
    check_spec(spec, call="permute_state_dict(state_dict, spec, perms)")
    check_permutations(spec, perms)
    for name in dict.fromkeys(ax.tensor for g in spec.groups for ax in g.axes):  # in spec order
        want = spec.shapes.get(name)
        if name not in state:
            raise ShapeMismatchError(f"the spec permutes tensor {name!r}, which the state dict lacks")
        if want is not None and tuple(state[name].shape) != tuple(want):
            raise ShapeMismatchError(f"tensor {name!r} has shape {list(state[name].shape)} in the state dict but "
                                     f"{list(want)} in the spec: the spec was compiled for another model")
    out = OrderedDict(state)
    if hasattr(state, "_metadata"):  # version info some modules' _load_from_state_dict needs
        out._metadata = state._metadata  # type: ignore[attr-defined]
    for g in sorted(spec.groups, key=lambda g: g.parent is not None):  # parents before their children
        p = perms[g.name].long()
        for axis in g.axes:
            out[axis.tensor] = apply_axis(out[axis.tensor], axis, p)
    for canon, aliases in spec.tied.items():
        for alias in aliases:
            if alias in out and canon in out:
                out[alias] = out[canon]
    return out


def permute(model: nn.Module, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> nn.Module:
    """A new module of the same class whose weights are permuted by ``perms``; same function.

    The caller's model is not modified. Example::

        model_p = permute(model, spec, random_permutation(spec, seed=1))
        torch.allclose(model_p(x), model(x))   # True
    """
    check_module(model, "model")
    check_spec(spec, call="permute(model, spec, perms)")
    state = model.state_dict()
    spec.check_model(state)
    new_state = permute_state_dict(state, spec, perms)
    return copy_with_state(model, new_state)


def _inverse(p: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a 1-D or 2-D permutation."""
    inv = torch.empty_like(p)
    inv.scatter_(-1, p, torch.arange(p.shape[-1], device=p.device, dtype=p.dtype).expand_as(p).contiguous())
    return inv


def _parents(perms: Mapping[str, torch.Tensor], spec: PermutationSpec | None) -> dict[str, str]:
    """Each child name with a 2-D permutation -> its parent's name (needs ``spec``)."""
    two_d = [n for n, p in perms.items() if p.dim() == 2]
    if two_d and spec is None:
        raise PermutationError(f"groups {two_d} hold one permutation per parent slot; pass spec= so that "
                               "their parents are known")
    return {n: spec.group(n).parent for n in two_d} if two_d else {}


def invert(perms: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None) -> Perms:
    """The inverse of each permutation: ``invert(p)[p[i]] = i``. A child's per-parent-slot rows
    follow the parent (``spec`` names it): ``inv[h] = inverse(child[parent_inv[h]])``."""
    parents = _parents(perms, spec)
    out: Perms = {name: _inverse(p) for name, p in perms.items()}
    for child, parent in parents.items():
        out[child] = out[child][out[parent].to(out[child].device)]  # a parent is always 1-D
    return out


def compose(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor],
            spec: PermutationSpec | None = None) -> Perms:
    """The permutation that applies ``first`` and then ``second``: ``first[second]``; a child's
    rows compose through the parent: ``out[h] = first_c[second_parent[h]][second_c[h]]``.

    ``permute(permute(m, spec, first), spec, second) == permute(m, spec, compose(first, second, spec))``.
    """
    parents = _parents({**first, **second}, spec)
    out: Perms = {}
    for name in first:
        a, b = first[name], second[name]
        if name not in parents:
            out[name] = a[b]
            continue
        m = spec.group(parents[name]).size
        a2, b2 = (x if x.dim() == 2 else x.expand(m, -1) for x in (a, b))
        out[name] = torch.gather(a2[second[parents[name]]], 1, b2)
    return out
