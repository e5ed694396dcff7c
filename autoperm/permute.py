"""The permute back end: random permutations, applying them, inverting and composing them.

A permutation ``p`` (a LongTensor holding each of ``0..n-1`` once) acts by gather:
``new[i] = old[p[i]]`` along each slot block of its group (`autoperm.spec.Axis`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping

import torch
from torch import nn

from ._copy import copy_with_state
from .errors import PermutationError
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
    checks meaningful: a random permutation of size 2 is the identity half the time.

    Example::

        perms = random_permutation(spec, seed=0)   # {'fc1': tensor([3, 0, 2, 1, ...]), ...}
    """
    gen = torch.Generator().manual_seed(int(seed))
    out: Perms = {}
    for g in spec.groups:
        if derangement and g.size >= 2:
            shift = torch.randperm(g.size, generator=gen)
            # a cyclic shift of a random ordering has no fixed point
            p = torch.empty(g.size, dtype=torch.long)
            p[shift] = shift.roll(1)
        else:
            p = torch.randperm(g.size, generator=gen)
        out[g.name] = p
    return out


def check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    """Raise `PermutationError` naming the group if ``perms`` is missing, extra or invalid."""
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
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.dtype not in (torch.int64, torch.int32):
            raise PermutationError(f"permutation of group {g.name!r} must be a 1-D integer tensor")
        if p.numel() != g.size:
            raise PermutationError(f"permutation of group {g.name!r} has length {p.numel()}, "
                                   f"the group has size {g.size}")
        if not torch.equal(torch.sort(p.cpu()).values, torch.arange(g.size)):
            raise PermutationError(f"permutation of group {g.name!r} is not a permutation of 0..{g.size - 1}")


def apply_axis(t: torch.Tensor, axis: Axis, perm: torch.Tensor) -> torch.Tensor:
    """``t`` with the slots of ``axis`` gathered by ``perm`` (a new tensor)."""
    size = perm.numel()
    n = axis.extent(size)
    dim = axis.dim
    block = t.narrow(dim, axis.offset, n)
    shape = list(t.shape)
    view = block.reshape(shape[:dim] + [axis.outer, size, axis.inner] + shape[dim + 1:])
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
    """A new state dict with every axis of ``spec`` permuted; tied aliases follow their tensor."""
    check_permutations(spec, perms)
    out = OrderedDict(state)
    if hasattr(state, "_metadata"):  # version info some modules' _load_from_state_dict needs
        out._metadata = state._metadata  # type: ignore[attr-defined]
    for g in spec.groups:
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
    state = model.state_dict()
    spec.check_model(state)
    new_state = permute_state_dict(state, spec, perms)
    return copy_with_state(model, new_state)


def invert(perms: Mapping[str, torch.Tensor]) -> Perms:
    """The inverse of each permutation: ``invert(p)[p[i]] = i``."""
    out: Perms = {}
    for name, p in perms.items():
        inv = torch.empty_like(p)
        inv[p] = torch.arange(p.numel(), device=p.device, dtype=p.dtype)
        out[name] = inv
    return out


def compose(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> Perms:
    """The permutation that applies ``first`` and then ``second``: ``first[second]``.

    ``permute(permute(m, spec, first), spec, second) == permute(m, spec, compose(first, second))``.
    """
    return {name: first[name][second[name]] for name in first}
