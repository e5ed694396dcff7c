"""Reductions and spatial ops: sums, means, maxima, pooling, resampling.

A reduction is invariant to any permutation of the dims it reduces, so those dims are left
unconstrained and the kept dims are tied to the output. Ops that return *positions* along a dim
(argmax, the indices of max.dim, sort, topk) are not equivariant in their values, so that dim is
frozen. Pooling and resampling mix neighbouring pixels: their spatial dims are frozen and the
batch and channel dims are tied.
"""

from __future__ import annotations

from ..ir import Constraint, Tie
from .base import RuleContext, aten_ops, norm_dim, register_rule
from .pointwise import broadcast_to_out


def _dims(ctx: RuleContext, rank: int) -> list[int]:
    d = ctx.arg("dim")
    empty = isinstance(d, (list, tuple)) and len(d) == 0
    if empty and getattr(ctx.node.target, "_overloadname", "") == "dims":
        return []  # any.dims / all.dims with dim=() reduce nothing (elementwise)
    if d is None or empty:
        return list(range(rank))
    return sorted({norm_dim(v, rank) for v in ([d] if isinstance(d, int) else d)})


def _kept(ctx: RuleContext, x: list[int], out: list[int], reduced: list[int]) -> list[Constraint]:
    if len(out) == len(x):  # keepdim
        return [Tie(x[k], out[k]) for k in range(len(x)) if k not in reduced]
    return ctx.tie_all([x[k] for k in range(len(x)) if k not in reduced], out)


@register_rule(*aten_ops("sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "nansum",
                         "linalg_vector_norm", "norm", "any", "all", "count_nonzero", "var_mean",
                         "std_mean"))
def reduction(ctx: RuleContext) -> list[Constraint]:
    """Reduction: reduced dims are unconstrained (the result is symmetric), kept dims tied."""
    x = ctx.atoms(ctx.arg("self", ctx.arg("input")))
    outs = ctx.out if (ctx.out and isinstance(ctx.out[0], list)) else [ctx.out]
    reduced = _dims(ctx, len(x))
    return [c for o in outs for c in _kept(ctx, x, o, reduced)]


@register_rule(*aten_ops("max", "min", "argmax", "argmin", "sort", "topk", "kthvalue", "median",
                         "nanmedian", "mode", "cummax", "cummin", "argsort"))
def positional_reduction(ctx: RuleContext) -> list[Constraint]:
    """max.dim / argmax / sort / topk: indices name positions, so the reduced dim is frozen."""
    x = ctx.atoms(ctx.arg("self"))
    if ctx.atoms(ctx.arg("other")) is not None:  # max.other / min.other: elementwise
        from .pointwise import broadcast_to_out

        return broadcast_to_out(ctx, ctx.tensor_args(), ctx.out)
    outs = ctx.out if (ctx.out and isinstance(ctx.out[0], list)) else [ctx.out]
    if "dim" not in ctx.args and ctx.node.target.overloadpacket.__name__ in ("max", "min"):
        return []  # global max / min: a symmetric value
    reduced = _dims(ctx, len(x))
    cons = ctx.freeze([x[k] for k in reduced], "positions along this dim are returned")
    for o in outs:
        if len(o) == len(x):  # keepdim, sort, topk: the dim stays, in position order
            cons += ctx.freeze([o[k] for k in reduced], "positions along this dim are returned")
        cons += _kept(ctx, x, o, reduced)
    return cons


_SPATIAL = {
    1: ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d",
        "max_pool1d_with_indices", "upsample_nearest1d", "upsample_linear1d", "reflection_pad1d",
        "replication_pad1d"),
    2: ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
        "adaptive_max_pool2d", "max_pool2d_with_indices", "upsample_nearest2d",
        "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_bilinear2d_aa",
        "_upsample_bicubic2d_aa", "_upsample_nearest_exact2d", "reflection_pad2d",
        "replication_pad2d", "lp_pool2d"),
    3: ("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "_adaptive_avg_pool3d",
        "adaptive_max_pool3d", "max_pool3d_with_indices", "upsample_nearest3d",
        "upsample_trilinear3d", "reflection_pad3d", "replication_pad3d"),
}


def _spatial(n: int):
    def rule(ctx: RuleContext) -> list[Constraint]:
        x = ctx.atoms(ctx.arg("self", ctx.arg("input")))
        outs = ctx.out if isinstance(ctx.out[0], list) else [ctx.out]
        cons = ctx.freeze(x[-n:] + [a for o in outs for a in o[-n:]], "pooling / resampling window")
        for o in outs:
            cons += ctx.tie_all(x[:-n], o[:-n])
        return cons

    rule.__doc__ = f"{n}-D pooling / resampling / padding: spatial dims frozen, others tied."
    rule.__name__ = f"spatial{n}d"
    return rule


for _n, _names in _SPATIAL.items():
    register_rule(*aten_ops(*_names), family="reduce")(_spatial(_n))


@register_rule(*aten_ops("cosine_similarity"))
def cosine_similarity(ctx: RuleContext) -> list[Constraint]:
    """Cosine similarity over ``dim``: a sum over that dim (of products and squares), symmetric
    when both inputs permute it alike (tied); the other dims broadcast to the output."""
    x1, x2, out = ctx.atoms(ctx.arg("x1")), ctx.atoms(ctx.arg("x2")), ctx.out
    rank = max(len(x1), len(x2))
    d = norm_dim(ctx.arg("dim", 1), rank)
    if len(out) != rank - 1:
        return ctx.freeze(x1 + x2 + out, "cosine similarity of shapes that do not broadcast")
    # each input without the compared dim stays right-aligned with the output
    kept = [[a for i, a in enumerate(x) if i + rank - len(x) != d] for x in (x1, x2)]
    contracted = [a for x in (x1, x2) for i, a in enumerate(x) if i + rank - len(x) == d and ctx.size(a) != 1]
    cons = broadcast_to_out(ctx, kept, out)
    if len(contracted) == 2:
        if ctx.size(contracted[0]) != ctx.size(contracted[1]):
            return ctx.freeze(x1 + x2 + out, "cosine similarity of shapes that do not broadcast")
        cons.append(Tie(*contracted))
    return cons


@register_rule(*aten_ops("cdist"))
def cdist(ctx: RuleContext) -> list[Constraint]:
    """Pairwise distances ``(..., P, M), (..., R, M) -> (..., P, R)``: a sum over the feature
    dim M, symmetric when both inputs permute it alike (tied); rows carry to the output."""
    x1, x2, out = ctx.atoms(ctx.arg("x1")), ctx.atoms(ctx.arg("x2")), ctx.out
    if len(x1) < 2 or len(x2) < 2 or ctx.size(x1[-1]) != ctx.size(x2[-1]):
        return ctx.freeze(x1 + x2 + out, "cdist of unexpected shapes")
    return [Tie(x1[-1], x2[-1]), Tie(x1[-2], out[-2]), Tie(x2[-2], out[-1])] + broadcast_to_out(
        ctx, [x1[:-2], x2[:-2]], out[:-2])
