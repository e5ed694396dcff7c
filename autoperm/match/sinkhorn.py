"""Sinkhorn re-basin: soft permutations learned by gradient descent (Peña et al. 2023, "Re-basin
via implicit Sinkhorn differentiation"; summarized in the Distill-and-Merge thesis, ../papers/000,
section 3 "Sinkhorn Operator", and used for its merges in section 7).

Each group ``g`` of ``n`` units holds free logits ``L_g`` (``n x n``). Its soft permutation is
the Sinkhorn operator of the logits, ``S(L_g)``: rows and columns normalized alternately (in log
space, ``iters`` times), a doubly stochastic matrix that tends to a permutation matrix as the
logits sharpen. A hard permutation ``p`` is the matrix ``P[i, p[i]] = 1`` (gather convention:
``new[i] = old[p[i]]``), so a soft one acts by ``new[i] = sum_j S[i, j] old[j]`` on every slot
block of the group's axes (offset / outer / inner layouts included: `soft_apply_axis`, the soft
counterpart of `autoperm.permute.apply_axis`).

Objectives (minimized with Adam; the logits start at zero plus seeded noise of 1e-3):

* ``"weight"``: ``sum_t ||A_t - S(B)_t||^2 / sum_t (||A_t||^2 + ||B_t||^2)`` over the float
  tensors the spec touches (no data);
* ``"loss"``: the midpoint model's loss ``loss_fn(f((A + S(B)) / 2)(x), y)`` on data
  (`autoperm.match._loss.MidpointLoss`), one batch per step, cyclically.

Gradients flow through the unrolled Sinkhorn iterations (Peña et al. differentiate them
implicitly; unrolling gives the same gradient in the limit and is simpler). At the end each soft
matrix is hardened to the nearest permutation in Frobenius norm: a linear assignment maximizing
``sum_i S[i, p[i]]``.

Example::

    al = autoperm.match(model_a, model_b, method="sinkhorn", steps=300, lr=0.1)
    al = autoperm.match(model_a, model_b, method="sinkhorn", data=loader,
                        loss_fn=torch.nn.functional.cross_entropy)
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from ..permute import permute_state_dict
from ..spec import Axis, PermutationSpec
from ._loss import check_budget, descend, touched_float_keys
from .assignment import solve_assignment

__all__ = ["sinkhorn", "soft_apply_axis", "soft_permute_state", "sinkhorn_matching"]

log = logging.getLogger(__name__)


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """The Sinkhorn operator: ``exp(logits)`` normalized over rows, then columns, ``iters`` times."""
    z = logits
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=1, keepdim=True)
        z = z - torch.logsumexp(z, dim=0, keepdim=True)
    return z.exp()


def soft_apply_axis(t: torch.Tensor, axis: Axis, soft: torch.Tensor) -> torch.Tensor:
    """``t`` with the slots of ``axis`` mixed by the ``(size, size)`` matrix ``soft``:
    ``new[i] = sum_j soft[i, j] old[j]``; with a permutation matrix this is `apply_axis`."""
    size = soft.shape[0]
    n = axis.extent(size)
    dim = axis.dim
    block = t.narrow(dim, axis.offset, n)
    shape = list(t.shape)
    view = block.reshape(shape[:dim] + [axis.outer, size, axis.inner] + shape[dim + 1:])
    mixed = torch.movedim(view, dim + 1, -1) @ soft.to(t.dtype).T
    moved = torch.movedim(mixed, -1, dim + 1).reshape(block.shape)
    if n == t.shape[dim]:
        return moved
    return torch.cat([t.narrow(dim, 0, axis.offset), moved,
                      t.narrow(dim, axis.offset + n, t.shape[dim] - axis.offset - n)], dim)


def soft_permute_state(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       soft: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The soft counterpart of `autoperm.permute_state_dict`: every axis of every group mixed by
    that group's matrix (tied aliases follow their tensor)."""
    out = dict(state)
    for g in spec.groups:
        for ax in g.axes:
            t = out[ax.tensor]
            if not t.is_floating_point():
                raise TypeError(f"group {g.name!r} acts on the integer tensor {ax.tensor!r}, which a soft "
                                "permutation cannot mix; use method='weight'")
            out[ax.tensor] = soft_apply_axis(t, ax, soft[g.name])
    for canon, aliases in spec.tied.items():
        for alias in aliases:
            if alias in out and canon in out:
                out[alias] = out[canon]
    return out


def sinkhorn_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor],
                      state_b: Mapping[str, torch.Tensor], *, objective=None, steps: int = 300,
                      lr: float = 0.1, seed: int = 0, iters: int = 20,
                      init: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Permutations for ``state_b`` learned through Sinkhorn soft permutations (module docstring).

    ``objective`` is ``None`` for the weight distance, or a callable ``objective(aligned_b, step)
    -> scalar`` (`autoperm.match._loss.MidpointLoss`). ``init`` (hard permutations) starts the
    logits at ``5 * P`` instead of zero. Returns the hardened permutations and the objective
    per step. A child group (hierarchical spec) is learned as one permutation shared by every
    parent slot, which is always sound.
    """
    check_budget(steps, lr)
    gen = torch.Generator().manual_seed(int(seed))
    ref = next(iter(state_a.values()))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    logits = {}
    for g in spec.groups:
        start = 1e-3 * torch.randn(g.size, g.size, generator=gen, dtype=torch.float64)
        if init is not None:
            start = start + 5.0 * torch.eye(g.size, dtype=torch.float64)[init[g.name].cpu()]
        logits[g.name] = start.to(dtype=dtype, device=ref.device).requires_grad_(True)
    keys = touched_float_keys(spec, state_b)
    a = {k: v.detach() for k, v in state_a.items()}
    b = {k: v.detach() for k, v in state_b.items()}
    scale = sum(float(a[k].double().pow(2).sum() + b[k].double().pow(2).sum()) for k in keys) or 1.0

    def value_at(step):
        moved = soft_permute_state(b, spec, {name: sinkhorn(lg, iters) for name, lg in logits.items()})
        if objective is None:
            return sum((a[k] - moved[k]).pow(2).sum() for k in keys) / scale
        return objective(moved, step)

    history = descend(list(logits.values()), value_at, steps=steps, lr=lr, log=log, desc="sinkhorn",
                      what="objective")
    with torch.no_grad():
        perms = {name: solve_assignment(sinkhorn(lg, iters)) for name, lg in logits.items()}
    if objective is None and log.isEnabledFor(logging.INFO):
        # the objective of the hardened answer, comparable with the soft ones (for the log only)
        hard = permute_state_dict(b, spec, perms)
        final = float(sum((a[k] - hard[k]).double().pow(2).sum() for k in keys)) / scale
        log.info("sinkhorn: hardened objective %.6g", final)
    return perms, history
