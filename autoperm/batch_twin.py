"""Specs of graphs exported at a fixed batch size.

torch.export keeps the batch dim symbolic where it can, and the analysis then cannot tie a
hidden dim to it. Where the batch is fixed (the model takes ``*args``, so the dynamic export
fails; or the forward turns a size into a Python int, ``int(x.shape[0])``, and the export
specializes it), a reshape that mixes the batch with features is analyzed with concrete sizes,
and a group found there may hold at that batch size only (``h.T.reshape(n, 6)``: sound at the
example's batch, wrong at any other). So such a model is also exported at two other batch
sizes (its *twins*: the first two of `twin_sizes` the model runs at, inputs grown by
`grown_inputs`), and only the groups found identical in all the graphs are kept
(`keep_shared_groups`); the others are frozen with the reason. Python arithmetic on the batch
size that agrees at all three sizes can still hide a dependence: the spec is checked, not
proven, at other batch sizes. A model that raises at every other size runs at its example's
batch only, and its spec stands (with a warning).

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

__all__ = ["batch_size", "twin_sizes", "grown_inputs", "keep_shared_groups"]


def batch_size(inputs: tuple[torch.Tensor, ...]) -> int | None:
    """The leading size of the first input with a dim (None when every input is 0-dim)."""
    return next((int(t.shape[0]) for t in inputs if t.dim() > 0), None)


def twin_sizes(batch: int) -> list[int]:
    """Batch sizes to try for the twins, in order (the first two the model runs at are used):
    near the example's and farther off, so that ``n // 4`` or a parity branch differs somewhere."""
    return [batch + 1, batch + 2, 2 * batch + 5, 2 * batch + 6]


def grown_inputs(inputs: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """``inputs`` with every input whose leading size is the batch's brought to ``size``
    examples (repeating them in turn); the others (a 0-dim scale, a context row) unchanged."""
    batch = batch_size(inputs)

    def grow(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != batch:
            return t
        reps = -(-size // batch)
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:size].clone()
    return tuple(grow(t) for t in inputs)


def _axes_key(g: PermGroup) -> tuple:
    return g.size, frozenset((a.tensor, a.dim, a.offset, a.outer, a.inner) for a in g.axes)


def keep_shared_groups(spec: PermutationSpec, sites: dict, twin: PermutationSpec,
                       reason: str) -> tuple[PermutationSpec, dict]:
    """``spec`` without the groups that ``twin`` (the same model compiled at another batch
    size) lacks: their slots become `Frozen` with ``reason``. A kept child group (one
    permutation per slot of its parent) stays a child only if ``twin`` has it as a child of the
    same parent; otherwise it becomes a plain group (one permutation for every slot: a special
    case of one per slot, and what the twin found)."""
    twins = {_axes_key(g): g for g in twin.groups}
    mine = {g.name: g for g in spec.groups}
    dropped = {g.name for g in spec.groups if _axes_key(g) not in twins}
    for g in spec.groups:
        if g.name in dropped:
            spec.frozen.extend(Frozen(a.tensor, a.dim, g.size, reason, a.offset, a.outer, a.inner) for a in g.axes)
    spec.groups = [g for g in spec.groups if g.name not in dropped]
    for g in spec.groups:
        if g.parent is None:
            continue
        other = twins[_axes_key(g)]
        if g.parent in dropped or other.parent is None or (
                _axes_key(mine[g.parent]) != _axes_key(twin.group(other.parent))):
            g.parent = None
    return spec, {k: v for k, v in sites.items() if k not in dropped}
