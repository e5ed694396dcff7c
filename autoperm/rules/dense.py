"""Ops with a weight: linear, matrix products, convolutions (grouped, depthwise, transposed),
embedding and PReLU.

A product ties its contraction dims (permuting k in both operands leaves ``sum_k a_k b_k``
unchanged) and carries the free dims to the output. A convolution with ``groups = g`` sees its
channel dims as ``prod(group, within)``: the group index is shared by input, weight and output, so
permuting whole groups together is allowed, and the within-group permutation is shared by all
groups (one atom). Depthwise convs (``within = 1``) tie input and output channels. Kernel and
spatial dims are frozen: a convolution is not equivariant to moving pixels.
"""

from __future__ import annotations

from ..ir import Compose, Constraint, Tie
from .base import RuleContext, aten_ops, register_rule
from .pointwise import broadcast_to_out

__all__ = ["matmul_constraints"]


@register_rule(*aten_ops("linear"))
def linear(ctx: RuleContext) -> list[Constraint]:
    """Linear ``x W^T + b``: x's last dim ~ W dim 1; W dim 0 ~ b ~ output's last dim."""
    x, w, out = ctx.atoms(ctx.arg("input")), ctx.atoms(ctx.arg("weight")), ctx.out
    b = ctx.atoms(ctx.arg("bias"))
    if len(w) == 1:
        cons = [Tie(x[-1], w[0])] + ctx.tie_all(x[:-1], out)
    else:
        cons = [Tie(x[-1], w[1]), Tie(w[0], out[-1])] + ctx.tie_all(x[:-1], out[:-1])
    if b is not None:  # the bias broadcasts to the output (F.linear takes a bias of one element too)
        cons += broadcast_to_out(ctx, [b], out)
    return cons


def matmul_constraints(ctx: RuleContext, a: list[int], b: list[int], out: list[int]) -> list[Constraint]:
    """``a @ b`` with numpy broadcasting of batch dims; 1-D operands as in torch.matmul."""
    if len(a) == 1 and len(b) == 1:
        return [Tie(a[0], b[0])]
    if len(a) == 1:
        return [Tie(a[0], b[-2]), Tie(b[-1], out[-1])] + ctx.tie_all(b[:-2], out[:-1])
    if len(b) == 1:
        return [Tie(a[-1], b[0])] + ctx.tie_all(a[:-1], out)
    cons: list[Constraint] = [Tie(a[-1], b[-2]), Tie(a[-2], out[-2]), Tie(b[-1], out[-1])]
    batch_out = out[:-2]
    for side in (a[:-2], b[:-2]):
        lead = len(batch_out) - len(side)
        for i, atom in enumerate(side):
            if ctx.size(atom) == ctx.size(batch_out[lead + i]):
                cons.append(Tie(atom, batch_out[lead + i]))
    return cons


@register_rule(*aten_ops("matmul", "mm", "bmm"))
def matmul(ctx: RuleContext) -> list[Constraint]:
    """Matrix product: contraction dims tied, free dims carried to the output."""
    return matmul_constraints(ctx, ctx.atoms(ctx.arg("self")), ctx.atoms(ctx.arg("other", ctx.arg("mat2"))),
                              ctx.out)


@register_rule(*aten_ops("addmm", "baddbmm", "addbmm", "addmv"))
def addmm(ctx: RuleContext) -> list[Constraint]:
    """``beta * bias + a @ b``: the product's rule, and the bias broadcast to the output."""
    from .pointwise import broadcast_to_out

    a = ctx.atoms(ctx.arg("mat1", ctx.arg("batch1", ctx.arg("mat"))))
    b = ctx.atoms(ctx.arg("mat2", ctx.arg("batch2", ctx.arg("vec"))))
    if ctx.node.target.overloadpacket.__name__ == "addbmm":
        bias = ctx.atoms(ctx.arg("self")) or []
        return ctx.freeze(a + b + bias + ctx.out, "addbmm sums over the batch")
    return matmul_constraints(ctx, a, b, ctx.out) + broadcast_to_out(ctx, [ctx.atoms(ctx.arg("self"))], ctx.out)


def _conv(ctx: RuleContext, transposed: bool) -> list[Constraint]:
    x, w, out = ctx.atoms(ctx.arg("input")), ctx.atoms(ctx.arg("weight")), ctx.out
    b = ctx.atoms(ctx.arg("bias"))
    groups = ctx.arg("groups", 1)
    if isinstance(groups, bool) or not isinstance(groups, int):  # computed at run time (a batch-sized count)
        return ctx.freeze(x + w + out + (b or []), "convolution with a group count computed at run time")
    nsp = len(w) - 2
    nb = len(x) - nsp - 1  # 1 for a batched input, 0 for an unbatched one
    cons = ctx.tie_all(x[:nb], out[:nb])
    cons += ctx.freeze(x[nb + 1:] + out[nb + 1:] + w[2:], "convolution window (spatial dims)")
    cin, cout = x[nb], out[nb]
    group = ctx.fresh(groups)
    if not transposed:  # weight (Cout, Cin/g, *k)
        within_in = w[1]
        within_out = ctx.fresh(ctx.size(cout) // groups)
        cons += [Compose(w[0], "prod", (group, within_out))]
    else:  # weight (Cin, Cout/g, *k)
        within_in = ctx.fresh(ctx.size(cin) // groups)
        within_out = w[1]
        cons += [Compose(w[0], "prod", (group, within_in))]
    cons += [Compose(cin, "prod", (group, within_in)), Compose(cout, "prod", (group, within_out))]
    if b is not None:
        cons.append(Tie(b[0], cout))
    return cons


@register_rule(*aten_ops("conv1d", "conv2d", "conv3d"))
def conv(ctx: RuleContext) -> list[Constraint]:
    """Convolution: channels as ``prod(group, within)``; kernel and spatial dims frozen."""
    return _conv(ctx, transposed=False)


@register_rule(*aten_ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
def conv_transpose(ctx: RuleContext) -> list[Constraint]:
    """Transposed convolution: as a convolution with the weight's in/out dims swapped."""
    return _conv(ctx, transposed=True)


@register_rule(*aten_ops("convolution", "_convolution"))
def convolution(ctx: RuleContext) -> list[Constraint]:
    """Generic ``aten.convolution``: dispatches on its ``transposed`` flag."""
    return _conv(ctx, transposed=bool(ctx.arg("transposed")))


@register_rule(*aten_ops("embedding"))
def embedding(ctx: RuleContext) -> list[Constraint]:
    """Embedding: rows are named by token ids (frozen); the feature dim goes to the output."""
    w, idx, out = ctx.atoms(ctx.arg("weight")), ctx.atoms(ctx.arg("indices")), ctx.out
    cons = ctx.freeze([w[0]], "embedding rows are indexed by token ids")
    return cons + [Tie(w[1], out[-1])] + ctx.tie_all(idx, out[:-1])


@register_rule(*aten_ops("prelu", "_prelu_kernel"))
def prelu(ctx: RuleContext) -> list[Constraint]:
    """PReLU: one slope per channel (dim 1), or one shared slope."""
    x, w, out = ctx.atoms(ctx.arg("self")), ctx.atoms(ctx.arg("weight")), ctx.out
    cons = ctx.tie_all(x, out)
    if len(w) == 1 and ctx.size(w[0]) != 1:
        cons.append(Tie(w[0], x[1] if len(x) >= 2 else x[0]))
    elif len(w) > 1:  # _prelu_kernel gets a weight already shaped to broadcast
        from .pointwise import broadcast_to_out

        cons += broadcast_to_out(ctx, [w], out)
    return cons


def _einsum_terms(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]] | None:
    """Split an einsum equation into per-operand and output index lists, expanding ``...``."""
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    n_ell = max((r - (len(t) - 3) for t, r in zip(terms, ranks) if "..." in t), default=0)
    ell = [f"@{i}" for i in range(n_ell)]
    out_terms = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            k = r - (len(t) - 3)
            pre, post = t.split("...")
            out_terms.append(list(pre) + ell[n_ell - k:] + list(post))
        else:
            out_terms.append(list(t))
    if not rhs and "->" not in eq:
        letters = sorted({c for t in out_terms for c in t if not c.startswith("@")})
        singles = [c for c in letters if sum(t.count(c) for t in out_terms) == 1]
        out = ell + singles
    else:
        pre, _, post = rhs.partition("...")
        out = list(pre) + (ell if "..." in rhs else []) + list(post)
    return out_terms, out


@register_rule(*aten_ops("einsum"))
def einsum(ctx: RuleContext) -> list[Constraint]:
    """Einsum: dims with one index letter are one index space (tied across operands and output);
    a letter repeated inside one operand (a diagonal) is frozen."""
    ops = [ctx.atoms(t) for t in ctx.arg("tensors")]
    flat = [a for o in ops for a in (o or [])] + ctx.out
    parsed = _einsum_terms(ctx.arg("equation"), [len(o or []) for o in ops])
    if parsed is None or any(o is None for o in ops):
        return ctx.freeze(flat, "einsum equation not understood")
    terms, out_letters = parsed
    if len(out_letters) != len(ctx.out):
        return ctx.freeze(flat, "einsum equation not understood")
    by_letter: dict[str, list[int]] = {}
    for atoms, letters in list(zip(ops, terms)) + [(ctx.out, out_letters)]:
        for a, c in zip(atoms, letters):
            if ctx.size(a) != 1:
                by_letter.setdefault(c, []).append(a)
    cons: list[Constraint] = []
    for c, atoms in by_letter.items():
        diagonal = any(letters.count(c) > 1 for letters in terms)
        if diagonal:
            cons += ctx.freeze(atoms, "einsum diagonal")
        else:
            cons += [Tie(atoms[0], a) for a in atoms[1:]]
    return cons
