"""The arithmetic of partial merging (Partial Model Merging thesis, ../papers/004, chapter 3):
extended assignments with buffer units and the widened, partially merged tensors.

A group of ``n`` units gets an `Extension`: for each unit of the merged model, the unit of A and
the unit of B it comes from (``-1`` for none). Matched units come from both models and are
interpolated; an A-only unit keeps A's weights, a B-only unit keeps B's. The merged group has
``n + j`` units when ``j`` pairs were pulled apart (``j = ceil(gamma * n)`` with forced
assignment, at most that with adaptive assignment).

Widening one dim of one tensor (`widen_dim`) gives, per new slot, the old slot of A, the old slot
of B and a source mask (bit 1: A, bit 2: B); a dim no group acts on is shared (mask 3). An element
of a widened tensor combines its dims' masks with AND:

* 3 (every dim shared or matched): ``(1 - alpha) * A + alpha * B``;
* 1 (A only): A's value, times ``(1 - alpha)`` when every A-only dim of the element is a
  *contraction* dim (the units are summed over, e.g. a Linear weight's dim 1, so the element is
  an outgoing weight of an A-only unit into a merged unit or the output), else unscaled;
* 2 (B only): likewise with ``alpha``;
* 0 (an A-only and a B-only dim): zero, the two models do not talk to each other.

The thesis (section 3.3, the ``W'1 + W'2`` case) keeps those outgoing weights at full scale, so
at gamma = 1 its model returns the *sum* of the two models' logits; the scaling here makes it
return ``(1 - alpha) f_A + alpha f_B``, the ensemble, where every op on the widened dims is
unit-local (DESIGN.md section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["Extension", "WidenError", "extend_assignment", "keep_alignment", "widen_dim", "buffer_count",
           "widen_state"]

BOTH, ONLY_A, ONLY_B, NONE = 3, 1, 2, 0


class WidenError(ValueError):
    """A layout that widening cannot express (the caller freezes the groups involved)."""

    def __init__(self, message: str, groups: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.groups = tuple(groups)


@dataclass(frozen=True)
class Extension:
    """One group's extended assignment: merged unit ``i`` is A's unit ``src_a[i]`` and B's unit
    ``src_b[i]`` (``-1``: that model has no unit there)."""

    src_a: torch.Tensor
    src_b: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.src_a.numel())

    @property
    def matched(self) -> int:
        return int(((self.src_a >= 0) & (self.src_b >= 0)).sum())

    @property
    def split(self) -> int:
        """Number of pairs pulled apart (buffer units used): ``width - n``."""
        return int((self.src_b < 0).sum())

    def mask(self) -> torch.Tensor:
        """Per merged unit: 3 matched, 1 A only, 2 B only."""
        return (self.src_a >= 0).to(torch.uint8) + 2 * (self.src_b >= 0).to(torch.uint8)


def buffer_count(gamma: float, n: int) -> int:
    """``ceil(gamma * n)`` buffer units (thesis section 3.2), at most ``n``; exact for binary
    fractions, robust to float noise such as ``0.1 * 30 = 3.0000000000000004``."""
    return min(n, int(math.ceil(round(gamma * n, 9))))


def keep_alignment(perm: torch.Tensor) -> Extension:
    """The full merge of a group: A's unit ``i`` with B's unit ``perm[i]``."""
    return Extension(torch.arange(perm.numel()), perm.long().clone())


def extend_assignment(similarity: torch.Tensor, buffers: int, *, mode: str = "forced",
                      threshold: float = 0.0) -> Extension:
    """Solve the linear assignment problem extended by ``buffers`` buffer units (thesis 3.2).

    ``similarity[i, j]`` compares A's unit i with B's unit j (a correlation or a cosine; clamped
    to [-1, 1]). ``mode="forced"``: buffer-to-unit entries are +1 and buffer-to-buffer entries -1,
    so exactly ``buffers`` pairs are pulled apart, the ones whose removal leaves the best total
    similarity among the remaining matches (at least as good as splitting the ``buffers`` worst
    pairs of the full assignment). ``mode="adaptive"``: every buffer entry is ``threshold``, so a
    pair is pulled apart only when that beats keeping it; unused buffers are dropped.

    Example (the thesis's Figure 3.3 a, two buffers): ``extend_assignment(C, 2).split == 2``.
    """
    n = similarity.shape[0]
    if similarity.shape != (n, n):
        raise ValueError(f"similarity must be square, got shape {tuple(similarity.shape)}")
    if mode not in ("forced", "adaptive"):
        raise ValueError(f"assignment={mode!r}: choose 'forced' or 'adaptive'")
    c = torch.nan_to_num(similarity.detach().double().cpu()).clamp(-1.0, 1.0).numpy()
    k = int(buffers)
    if k <= 0:
        rows, cols = linear_sum_assignment(c, maximize=True)
        return Extension(torch.as_tensor(rows), torch.as_tensor(cols))
    big = np.full((n + k, n + k), float(threshold) if mode == "adaptive" else 1.0)
    big[:n, :n] = c
    if mode == "forced":
        big[n:, n:] = -1.0
    rows, cols = linear_sum_assignment(big, maximize=True)
    partner = dict(zip(rows.tolist(), cols.tolist()))
    src_b = [partner[i] if partner[i] < n else -1 for i in range(n)]
    b_only = sorted(c_ for r, c_ in partner.items() if r >= n and c_ < n)
    src_a = list(range(n)) + [-1] * len(b_only)
    return Extension(torch.tensor(src_a, dtype=torch.long), torch.tensor(src_b + b_only, dtype=torch.long))


# --------------------------------------------------------------------------- one dim
Layout = tuple[str, int, int, int, int]  # group, offset, outer, size, inner


def widen_dim(length: int, layouts: Sequence[Layout], ext: Mapping[str, Extension]):
    """Widen one dim of ``length`` slots on which the groups of ``layouts`` act.

    Returns ``(idx_a, idx_b, mask, origin)``, one entry per new slot: A's old slot, B's old slot
    (``-1``: none), the source mask, and the old slot it was made from (A's, else B's; every new
    slot has one, so ``(origin < b).sum()`` maps an old block boundary ``b`` to the new one).
    Layouts are applied one by one; the others are updated as the dim grows (a later slice
    moves, a coarser factor's ``inner`` or a finer factor's ``outer`` grows).
    """
    idx_a = torch.arange(length)
    idx_b = torch.arange(length)
    origin = torch.arange(length)
    mask = torch.full((length,), BOTH, dtype=torch.uint8)
    todo = [list(lay) for lay in layouts]
    while todo:
        g, off, outer, size, inner = todo.pop(0)
        e = ext[g]
        if int((e.src_a >= 0).sum()) != size:
            raise WidenError(f"group {g!r}: its extension has {int((e.src_a >= 0).sum())} units of A, "
                             f"the layout {size}", [g])
        span = outer * size * inner
        if off + span > idx_a.numel():
            raise WidenError(f"group {g!r}: layout [{off}:{off + span}] does not fit a dim of {idx_a.numel()}", [g])
        src_any = torch.where(e.src_a >= 0, e.src_a, e.src_b)

        def gather(arr, src, fill):
            block = arr[off:off + span].reshape(outer, size, inner)[:, src.clamp_min(0), :]
            if fill is not None:
                block = torch.where((src >= 0).view(1, -1, 1), block, torch.full_like(block, fill))
            return torch.cat([arr[:off], block.reshape(-1), arr[off + span:]])

        unit = e.mask().view(1, -1, 1)
        new_mask = mask[off:off + span].reshape(outer, size, inner)[:, src_any, :] & unit
        mask = torch.cat([mask[:off], new_mask.reshape(-1), mask[off + span:]])
        idx_a, idx_b = gather(idx_a, e.src_a, -1), gather(idx_b, e.src_b, -1)
        origin = gather(origin, src_any, None)
        width = e.width
        for other in todo:
            _update(other, (g, off, outer, size, inner), width)
    return idx_a, idx_b, mask, origin


def _update(y: list, x: Layout, width: int) -> None:
    """Adjust layout ``y`` (in place) after ``x`` grew from ``size`` to ``width`` units."""
    g, ox, outx, nx, inx = x
    ex = ox + outx * nx * inx
    gy, oy, outy, ny, iny = y
    ey = oy + outy * ny * iny
    if oy >= ex:
        y[1] = oy + outx * (width - nx) * inx
    elif ey <= ox:
        return
    elif oy == ox and ey == ex and iny % (nx * inx) == 0 and iny >= nx * inx:
        y[4] = iny // nx * width            # x lies inside y's inner factor
    elif oy == ox and ey == ex and inx % (ny * iny) == 0 and outy % nx == 0:
        y[2] = outy // nx * width           # y lies inside x's inner factor
    else:
        raise WidenError(f"groups {g!r} and {gy!r} share slots in a way widening cannot express", [g, gy])


# --------------------------------------------------------------------------- tensors
def _gather(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    picked = t.index_select(dim, idx.clamp_min(0).to(t.device))
    keep = (idx >= 0).to(t.device).view([-1 if d == dim else 1 for d in range(t.dim())])
    return torch.where(keep, picked, torch.zeros((), dtype=t.dtype, device=t.device))


def widen_state(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                layouts: Mapping[str, Mapping[int, list[Layout]]], ext: Mapping[str, Extension],
                contraction: Mapping[tuple[str, int], bool], alpha: float) -> dict[str, torch.Tensor]:
    """The partially merged state dict (module docstring). ``layouts[key][dim]`` lists the group
    layouts on each dim of each tensor; ``contraction[(key, dim)]`` says whether that dim's units
    are summed over by the op that reads the tensor. B is given unpermuted: the extensions say
    which B unit goes where. Integer tensors come from A (from B on B-only slots)."""
    out: dict[str, torch.Tensor] = {}
    for key, ta in state_a.items():
        tb = state_b[key]
        dims = layouts.get(key, {})
        if not dims:
            out[key] = torch.lerp(ta, tb.to(ta.dtype), float(alpha)) if ta.is_floating_point() else ta.clone()
            continue
        wa, wb = ta, tb
        masks: list[tuple[int, torch.Tensor]] = []
        for dim, lays in sorted(dims.items()):
            ia, ib, m, _ = widen_dim(ta.shape[dim], lays, ext)
            wa, wb = _gather(wa, dim, ia), _gather(wb, dim, ib)
            masks.append((dim, m))
        out[key] = _combine(key, wa, wb, masks, contraction, float(alpha))
    return out


def _combine(key, wa, wb, masks, contraction, alpha) -> torch.Tensor:
    rank = wa.dim()
    both = torch.full((), BOTH, dtype=torch.uint8)
    owned_a = torch.zeros((), dtype=torch.bool)   # an A-only dim that is not a contraction dim
    owned_b = torch.zeros((), dtype=torch.bool)
    for dim, m in masks:
        shape = [-1 if d == dim else 1 for d in range(rank)]
        mv = m.view(shape)
        both = both & mv
        if not contraction.get((key, dim), False):
            owned_a = owned_a | (mv == ONLY_A)
            owned_b = owned_b | (mv == ONLY_B)
    if not wa.is_floating_point():
        return torch.where(both == ONLY_B, wb, wa)
    wb = wb.to(wa.dtype)
    one = torch.ones((), dtype=wa.dtype)
    scale_a = torch.where(owned_a, one, one * (1 - alpha))
    scale_b = torch.where(owned_b, one, one * alpha)
    merged = torch.lerp(wa, wb, alpha)
    zero = torch.zeros((), dtype=wa.dtype)
    return torch.where(both == BOTH, merged,
                       torch.where(both == ONLY_A, wa * scale_a, torch.where(both == ONLY_B, wb * scale_b, zero)))
