"""Specs of graphs exported at a fixed batch size.

torch.export keeps the batch dim symbolic where it can, and the analysis then cannot tie a
hidden dim to it. Where the batch is fixed (the model takes ``*args``, so the dynamic export
fails; or the forward turns a size into a Python int, ``int(x.shape[0])``, and the export
specializes it), a reshape that mixes the batch with features is analyzed with concrete sizes,
and a group found there may hold at that batch size only (``h.T.reshape(n, 6)``: sound at the
example's batch, wrong at any other). So such a model is also exported at one more example
(its *twin*, `twin_inputs`), and only the groups found identical in both graphs are kept
(`keep_shared_groups`); the others are frozen with the reason. A model that raises at the
other batch size runs at its example's batch only, and its spec stands as compiled.

Example::

    class M(nn.Module):                       # a forward over *xs: exported at batch 3 only
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)
        def forward(self, *xs):
            return self.b(self.a(xs[0]).T.reshape(xs[0].shape[0], 6))
    spec = autoperm.trace(M(), torch.randn(3, 3))
    spec.groups          # []: the hidden group differs at batch 4, so it is frozen
"""

from __future__ import annotations

import torch

from .spec import Frozen, PermGroup, PermutationSpec

__all__ = ["twin_inputs", "keep_shared_groups"]


def twin_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
    """The example inputs with one more example (the first repeated), or None when they share
    no batch dim (a 0-dim input, or inputs of different leading sizes)."""
    if not inputs or any(t.dim() == 0 for t in inputs) or len({t.shape[0] for t in inputs}) != 1:
        return None
    return tuple(torch.cat([t, t[:1]]) for t in inputs)


def _key(g: PermGroup) -> tuple:
    return g.size, frozenset((a.tensor, a.dim, a.offset, a.outer, a.inner) for a in g.axes)


def keep_shared_groups(spec: PermutationSpec, sites: dict, twin: PermutationSpec,
                       reason: str) -> tuple[PermutationSpec, dict]:
    """``spec`` without the groups that ``twin`` (the same model compiled at another batch
    size) lacks: their slots become `Frozen` with ``reason``. A kept group whose parent was
    dropped becomes a plain group (one permutation for every slot: a special case of one per slot)."""
    keys = {_key(g) for g in twin.groups}
    dropped = {g.name for g in spec.groups if _key(g) not in keys}
    if not dropped:
        return spec, sites
    for g in spec.groups:
        if g.name in dropped:
            spec.frozen.extend(Frozen(a.tensor, a.dim, g.size, reason, a.offset, a.outer, a.inner) for a in g.axes)
    spec.groups = [g for g in spec.groups if g.name not in dropped]
    for g in spec.groups:
        if g.parent in dropped:
            g.parent = None
    return spec, {k: v for k, v in sites.items() if k not in dropped}
