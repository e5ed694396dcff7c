"""Attention: ``scaled_dot_product_attention`` and its CPU kernels.

``softmax(q k^T * scale) v`` over ``q (..., L, E)``, ``k (..., S, E)``, ``v (..., S, Ev)``:
q and k share the contraction dim E (one permutation of head_dim for q and k), k and v share
the key positions S (attention is invariant to reordering key-value pairs together), q and the
output share the query positions L, v and the output share Ev (a second head_dim permutation,
for v and the output projection). The batch and head dims are broadcast. A causal mask ties
token order, so L and S are frozen under ``is_causal``; an explicit mask follows (L, S).
Hand-written attention (matmul, softmax, matmul) gets the same result from the product rules.
"""

from __future__ import annotations

from ..ir import Constraint, Tie
from .base import RuleContext, aten_ops, register_rule
from .pointwise import broadcast_to_out


@register_rule(*aten_ops("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                         "_scaled_dot_product_attention_math"))
def sdpa(ctx: RuleContext) -> list[Constraint]:
    """Scaled dot-product attention: q/k share head_dim, k/v share keys, v/out share value dim."""
    q, k, v = (ctx.atoms(ctx.arg(n)) for n in ("query", "key", "value"))
    out = ctx.out[0] if isinstance(ctx.out[0], list) else ctx.out
    extra = ctx.out[1:] if isinstance(ctx.out[0], list) else []
    cons: list[Constraint] = [Tie(q[-1], k[-1]), Tie(k[-2], v[-2]), Tie(q[-2], out[-2]), Tie(v[-1], out[-1])]
    batch_out = out[:-2]
    for side in (q[:-2], k[:-2], v[:-2]):
        lead = len(batch_out) - len(side)
        for i, a in enumerate(side):
            if ctx.size(a) == ctx.size(batch_out[lead + i]):
                cons.append(Tie(a, batch_out[lead + i]))
            else:
                cons += ctx.freeze([a, batch_out[lead + i]], "grouped-query attention (shared kv heads)")
    for stat in extra:  # logsumexp (..., L)
        if stat is not None and len(stat) == len(out) - 1:
            cons += ctx.tie_all(stat, out[:-1])
    if ctx.arg("is_causal"):
        cons += ctx.freeze([q[-2], k[-2]], "causal mask fixes token order")
    mask = ctx.atoms(ctx.arg("attn_mask"))
    if mask is not None:
        scores = batch_out + [q[-2], k[-2]]
        cons += broadcast_to_out(ctx, [mask], scores)
    return cons
