"""Shape ops: views and reshapes, dim reorders, concatenation and splitting, indexing.

Reshapes are read from the input and output shapes (never from the size arguments, which may hold
-1 or symbols): both are cut into blocks of equal products, a block of one dim on each side is a
tie, and a larger block becomes one atom composed row-major of either side's dims, so a flatten of
``(C, H, W)`` into a Linear makes the Linear's input atom ``prod(C, H, W)``. Concatenation makes
the output atom ``sum`` of the inputs' atoms, and split / chunk / slice the reverse; a strided
slice ``x[s::k]`` makes the dim ``prod(rows, k)`` with the phase ``s`` frozen (RoPE's pairs).
"""

from __future__ import annotations

import operator

import sympy
import torch

from ..ir import Compose, Constraint, Tie
from .base import RuleContext, aten_ops, norm_dim, register_rule

__all__ = ["reshape_constraints"]


def _same(p, q) -> bool:
    if isinstance(p, int) and isinstance(q, int):
        return p == q
    return sympy.expand(p - q) == 0


def _hint(s) -> float:
    if isinstance(s, int):
        return float(s)
    return float(s.subs({sym: 10007 for sym in s.free_symbols}))


def reshape_constraints(ctx: RuleContext, xs: list[int], ys: list[int]) -> list[Constraint]:
    """Constraints for a reshape of a tensor with dims ``xs`` into one with dims ``ys``."""
    a = [x for x in xs if ctx.size(x) != 1]
    b = [y for y in ys if ctx.size(y) != 1]
    cons: list[Constraint] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ga, gb = [a[i]], [b[j]]
        pa, pb = ctx.size(a[i]), ctx.size(b[j])
        i, j = i + 1, j + 1
        while not _same(pa, pb):
            if _hint(pa) < _hint(pb) and i < len(a):
                ga.append(a[i])
                pa, i = pa * ctx.size(a[i]), i + 1
            elif _hint(pb) <= _hint(pa) and j < len(b):
                gb.append(b[j])
                pb, j = pb * ctx.size(b[j]), j + 1
            else:
                return ctx.freeze(xs + ys, "reshape whose blocks could not be matched")
        if len(ga) == 1 and len(gb) == 1:
            cons.append(Tie(ga[0], gb[0]))
        else:
            block = ctx.fresh(pa)
            cons += [Compose(block, "prod", tuple(ga)), Compose(block, "prod", tuple(gb))]
    if i < len(a) or j < len(b):
        return ctx.freeze(xs + ys, "reshape whose blocks could not be matched")
    return cons


@register_rule(*aten_ops("view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze",
                         "unsqueeze", "view_as", "reshape_as", "_reshape_alias"))
def reshape(ctx: RuleContext) -> list[Constraint]:
    """View / reshape / flatten / (un)squeeze: blocks of equal size are the same index space."""
    return reshape_constraints(ctx, ctx.atoms(ctx.arg("self")), ctx.out)


@register_rule(*aten_ops("permute", "transpose", "t", "swapaxes", "movedim", "numpy_T", "mT"))
def reorder(ctx: RuleContext) -> list[Constraint]:
    """Permute / transpose: output dim i is the input dim it came from (matched by position)."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    rank = len(x)
    order = list(range(rank))
    name = ctx.node.target.overloadpacket.__name__
    if name == "permute":
        order = [norm_dim(d, rank) for d in ctx.arg("dims")]
    elif name in ("transpose", "swapaxes"):
        d0 = norm_dim(ctx.arg("dim0", ctx.arg("axis0")), rank)
        d1 = norm_dim(ctx.arg("dim1", ctx.arg("axis1")), rank)
        order[d0], order[d1] = order[d1], order[d0]
    elif name in ("t", "numpy_T", "mT") and rank >= 2:
        order = order[:-2] + [rank - 1, rank - 2] if name != "numpy_T" else order[::-1]
    else:
        return ctx.freeze(x + out, f"dim reorder {name} is not understood")
    return [Tie(x[src], out[i]) for i, src in enumerate(order)]


@register_rule(*aten_ops("expand", "expand_as", "broadcast_to"))
def expand(ctx: RuleContext) -> list[Constraint]:
    """Expand: kept dims are tied; a broadcast dim holds equal values, so it is unconstrained."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    lead = len(out) - len(x)
    return [Tie(a, out[lead + i]) for i, a in enumerate(x) if ctx.size(a) == ctx.size(out[lead + i])]


@register_rule(*aten_ops("repeat"))
def repeat(ctx: RuleContext) -> list[Constraint]:
    """Repeat: a tiled dim is ``prod(copies, dim)``; the copies hold equal values (unconstrained)."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    lead = len(out) - len(x)
    cons: list[Constraint] = []
    for i, a in enumerate(x):
        o = out[lead + i]
        if ctx.size(a) == ctx.size(o):
            cons.append(Tie(a, o))
        else:
            cons.append(Compose(o, "prod", (ctx.fresh(ctx.size(o) // ctx.size(a)), a)))
    return cons


@register_rule(torch.ops.aten.repeat_interleave.self_int)
def repeat_interleave(ctx: RuleContext) -> list[Constraint]:
    """Repeat each slot ``r`` times in place: the dim becomes ``prod(dim, copies)`` (copies
    inner; they hold equal values, unconstrained); ``dim=None`` flattens first."""
    x, out, r = ctx.atoms(ctx.arg("self")), ctx.out, ctx.arg("repeats")
    copies = ctx.fresh(r)
    # the copies are not hidden units (moving them is sound but meaningless): kept in place
    keep = ctx.freeze([copies], "copies of repeat_interleave") if ctx.size(copies) != 1 else []
    d = ctx.arg("dim")
    if d is None:
        return [Compose(out[0], "prod", (*x, copies))] + keep
    d = norm_dim(d, len(x))
    return ctx.tie_all(x[:d], out[:d]) + ctx.tie_all(x[d + 1:], out[d + 1:]) + [
        Compose(out[d], "prod", (x[d], copies))] + keep


@register_rule(*aten_ops("cat", "concat", "concatenate"))
def cat(ctx: RuleContext) -> list[Constraint]:
    """Concatenation: the output dim is ``sum`` of the inputs' dims; other dims are tied."""
    parts = [p for p in (ctx.atoms(t) for t in ctx.arg("tensors")) if p is not None]
    out = ctx.out
    parts = [p for p in parts if len(p) == len(out)]  # legacy empty 1-D tensors are skipped
    d = norm_dim(ctx.arg("dim", 0), len(out))
    cons: list[Constraint] = [Compose(out[d], "sum", tuple(p[d] for p in parts))]
    for p in parts:
        cons += [Tie(p[k], out[k]) for k in range(len(out)) if k != d]
    return cons


@register_rule(*aten_ops("stack"))
def stack(ctx: RuleContext) -> list[Constraint]:
    """Stack: a new dim with one slot per input (frozen); the inputs' dims are tied to the rest."""
    parts = [p for p in (ctx.atoms(t) for t in ctx.arg("tensors")) if p is not None]
    out = ctx.out
    d = norm_dim(ctx.arg("dim", 0), len(out))
    cons = ctx.freeze([out[d]], "stack index (one fixed slot per stacked tensor)")
    rest = out[:d] + out[d + 1:]
    for p in parts:
        cons += ctx.tie_all(p, rest)
    return cons


@register_rule(*aten_ops("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split"))
def split(ctx: RuleContext) -> list[Constraint]:
    """Split / chunk: the input dim is ``sum`` of the pieces' dims; other dims are tied."""
    x, outs = ctx.atoms(ctx.arg("self")), ctx.out
    d = norm_dim(ctx.arg("dim", 0), len(x))
    cons: list[Constraint] = [Compose(x[d], "sum", tuple(o[d] for o in outs))]
    for o in outs:
        cons += [Tie(x[k], o[k]) for k in range(len(x)) if k != d]
    return cons


@register_rule(*aten_ops("unbind"))
def unbind(ctx: RuleContext) -> list[Constraint]:
    """Unbind: each output is one slot of the dim, so the dim is frozen; other dims are tied."""
    x, outs = ctx.atoms(ctx.arg("self")), ctx.out
    d = norm_dim(ctx.arg("dim", 0), len(x))
    cons = ctx.freeze([x[d]], "unbind picks fixed slots")
    for o in outs:
        cons += [Tie(a, b) for a, b in zip(x[:d] + x[d + 1:], o, strict=True)]
    return cons


def _span(n, start, end) -> tuple[int, int] | None:
    if not all(isinstance(v, int) or v is None for v in (n, start, end)) or n is None:
        return None
    start = 0 if start is None else (start + n if start < 0 else start)
    end = n if end is None else (end + n if end < 0 else end)
    start, end = max(0, min(start, n)), max(0, min(end, n))
    return start, max(start, end)


def _sliced(ctx: RuleContext, x: list[int], out: list[int], d: int, span, step, mid: int) -> list[Constraint]:
    others = [Tie(x[k], out[k]) for k in range(len(x)) if k != d]
    n, m = ctx.size(x[d]), ctx.size(mid)
    if step == 1 and _same(n, m):  # n of n contiguous slots: the whole dim, symbolic sizes too
        return others + [Tie(x[d], mid)]
    if span is not None and isinstance(step, int) and step > 1:
        return others + _strided(ctx, x[d], mid, span, step)
    if span is None or step != 1:
        return others + ctx.freeze([x[d], out[d]], "strided or symbolic slice")
    start, end = span
    return others + [Compose(x[d], "sum", (ctx.fresh(start), mid, ctx.fresh(n - end)))]


def _strided(ctx: RuleContext, a: int, mid: int, span, step: int) -> list[Constraint]:
    """``x[s::k]`` over a dim of ``m * k`` slots with ``s < k`` reads slot ``s`` of every row of k:
    the dim is ``prod(rows, k)``, the rows are the output's slots (a permutation of whole rows
    moves the output the same way) and the phase within a row is frozen. RoPE's interleaved
    ``rot(x)`` (``x[..., 1::2]`` and ``x[..., ::2]``) reads pairs this way."""
    n, (start, _) = ctx.size(a), span
    if not isinstance(n, int) or n % step or start >= step or ctx.size(mid) != n // step:
        return ctx.freeze([a, mid], "strided slice that does not read one slot of every row")
    phase = ctx.fresh(step)
    return [Compose(a, "prod", (mid, phase))] + ctx.freeze([phase], "strided slice reads a fixed phase")


@register_rule(*aten_ops("slice"))
def slice_(ctx: RuleContext) -> list[Constraint]:
    """Slice: step 1 makes the input dim ``sum(before, output, after)``; ``x[s::k]`` makes it ``prod(rows, k)``."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    d = norm_dim(ctx.arg("dim", 0), len(x))
    span = _span(ctx.size(x[d]), ctx.arg("start"), ctx.arg("end"))
    return _sliced(ctx, x, out, d, span, ctx.arg("step", 1), out[d])


@register_rule(*aten_ops("narrow"))
def narrow(ctx: RuleContext) -> list[Constraint]:
    """Narrow: like a slice of ``length`` slots from ``start``."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    d = norm_dim(ctx.arg("dim"), len(x))
    start = ctx.arg("start")
    span = _span(ctx.size(x[d]), start, start + ctx.arg("length")) if isinstance(start, int) else None
    return _sliced(ctx, x, out, d, span, 1, out[d])


@register_rule(*aten_ops("slice_scatter"))
def slice_scatter(ctx: RuleContext) -> list[Constraint]:
    """Slice scatter (functional slice assignment): the output is ``sum(before, src, after)``."""
    x, src, out = ctx.atoms(ctx.arg("self")), ctx.atoms(ctx.arg("src")), ctx.out
    d = norm_dim(ctx.arg("dim", 0), len(x))
    span = _span(ctx.size(x[d]), ctx.arg("start"), ctx.arg("end"))
    return ctx.tie_all(x, out) + _sliced(ctx, out, src, d, span, ctx.arg("step", 1), src[d])


@register_rule(*aten_ops("select"))
def select(ctx: RuleContext) -> list[Constraint]:
    """Select: one fixed slot of the dim is read, so the dim is frozen; other dims are tied."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    d = norm_dim(ctx.arg("dim"), len(x))
    return ctx.freeze([x[d]], "select reads a fixed slot") + ctx.tie_all(x[:d] + x[d + 1:], out)


@register_rule(*aten_ops("index_select"))
def index_select(ctx: RuleContext) -> list[Constraint]:
    """Index select: the indexed dim is frozen (indices name slots); other dims are tied."""
    x, out, idx = ctx.atoms(ctx.arg("self")), ctx.out, ctx.atoms(ctx.arg("index"))
    d = norm_dim(ctx.arg("dim"), len(x))
    cons = ctx.freeze([x[d], out[d]] + (idx or []), "indexed by position")
    return cons + [Tie(x[k], out[k]) for k in range(len(x)) if k != d]


@register_rule(*aten_ops("index"))
def index(ctx: RuleContext) -> list[Constraint]:
    """Advanced indexing ``x[i0, i1, ...]``: indexed dims are frozen (indices name slots), the
    other dims of ``x`` are tied to the output dims they land in."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    idx = list(ctx.arg("indices"))
    idx += [None] * (len(x) - len(idx))
    indexed = [k for k, i in enumerate(idx) if i is not None]
    idx_atoms = [a for i in idx for a in (ctx.atoms(i) or [])]
    n_new = len(out) - (len(x) - len(indexed))
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1)) if indexed else True
    start = indexed[0] if (indexed and adjacent) else 0
    kept = [k for k in range(len(x)) if k not in indexed]
    positions = [k if k < start else k - len(indexed) + n_new for k in kept] if adjacent else \
        [n_new + j for j in range(len(kept))]
    cons = ctx.freeze([x[k] for k in indexed] + out[start:start + n_new] + idx_atoms, "indexed by position")
    return cons + [Tie(x[k], out[p]) for k, p in zip(kept, positions)]


@register_rule(*aten_ops("flip", "roll", "cumsum", "cumprod", "logcumsumexp"))
def positional(ctx: RuleContext) -> list[Constraint]:
    """Flip / roll / cumulative ops: the dims they act on depend on order, so they are frozen."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    dims = ctx.arg("dims", ctx.arg("dim"))
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims:  # roll without dims acts on the flattened tensor
        return ctx.freeze(x + out, "order-dependent op over the whole tensor")
    ds = {norm_dim(d, len(x)) for d in dims}
    cons = ctx.freeze([x[d] for d in ds] + [out[d] for d in ds], "order-dependent op")
    return cons + [Tie(x[k], out[k]) for k in range(len(x)) if k not in ds]


@register_rule(*aten_ops("constant_pad_nd", "pad"))
def constant_pad(ctx: RuleContext) -> list[Constraint]:
    """Padding: a constant-padded dim is ``sum(pad, input, pad)``; other modes freeze padded dims."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    pad = list(ctx.arg("pad"))
    constant = ctx.arg("mode", "constant") == "constant"
    cons: list[Constraint] = []
    for k in range(len(x)):
        j = len(x) - 1 - k
        lo, hi = (pad[2 * j], pad[2 * j + 1]) if 2 * j + 1 < len(pad) else (0, 0)
        if lo == 0 and hi == 0:
            cons.append(Tie(x[k], out[k]))
        elif lo >= 0 and hi >= 0 and constant:
            cons.append(Compose(out[k], "sum", (ctx.fresh(lo), x[k], ctx.fresh(hi))))
        else:
            cons += ctx.freeze([x[k], out[k]], "reflect / replicate / cropping padding")
    return cons


@register_rule(*aten_ops("copy"))
def copy(ctx: RuleContext) -> list[Constraint]:
    """Copy (functional ``self.copy_(src)``): the output is ``src`` broadcast to self's shape."""
    from .pointwise import broadcast_to_out

    return broadcast_to_out(ctx, [ctx.atoms(ctx.arg("src"))], ctx.out)


@register_rule(*aten_ops("glu"))
def glu(ctx: RuleContext) -> list[Constraint]:
    """GLU: ``a * sigmoid(b)`` for the two halves of a dim; both halves share the output's atom."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    d = norm_dim(ctx.arg("dim", -1), len(x))
    half_a, half_b = ctx.fresh(ctx.size(out[d])), ctx.fresh(ctx.size(out[d]))
    cons = [Compose(x[d], "sum", (half_a, half_b)), Tie(half_a, out[d]), Tie(half_b, out[d])]
    return cons + [Tie(x[k], out[k]) for k in range(len(x)) if k != d]


@register_rule(operator.getitem)
def getitem(ctx: RuleContext) -> list[Constraint]:
    """getitem on a multi-output op: the output is that element of the tuple."""
    src = ctx.atoms(ctx.arg(0))
    idx = ctx.arg(1)
    if not isinstance(src, (list, tuple)) or not isinstance(idx, int) or not isinstance(src[idx], list):
        flat = [a for a in (ctx.out or []) if isinstance(a, int)]
        return ctx.freeze(flat, "getitem on a value that is not a tuple of tensors")
    return ctx.tie_all(src[idx], ctx.out)


@register_rule(*aten_ops("pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"))
def shuffle_ops(ctx: RuleContext) -> list[Constraint]:
    """Pixel / channel shuffle kernels: channels move to other positions; all dims frozen."""
    x = ctx.atoms(ctx.arg("self"))
    return ctx.freeze(x + ctx.out, "pixel / channel shuffle kernel")
