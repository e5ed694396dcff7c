"""Elementwise ops: one output element depends only on the input elements at the same index.

Every tensor argument is broadcast against the output (aligned from the right): a dim of the same
size is tied to the output's dim, a dim of size 1 is broadcast and constrains nothing. This one
rule covers activations, arithmetic with residuals, squeeze-excite gates (``x * gate`` with a
``(B, C, 1, 1)`` gate), layer scale (``x * gamma``), per-channel parameters used as tensors,
``where`` / ``masked_fill``, and softmax (equivariant along its own dim, since it treats the dim as a
set). Casts (``to``, ``_to_copy``, ``type_as``) tie only ``self`` to the output: ``x.type_as(v)``
reads v's dtype, never its values, so tying v would join unrelated index spaces (EVA's RoPE q / k
with v).
"""

from __future__ import annotations

from ..ir import Constraint, Tie
from .base import RuleContext, aten_ops, register_rule

__all__ = ["broadcast_to_out", "elementwise", "cast", "constant_factory", "random_factory"]


def broadcast_to_out(ctx: RuleContext, inputs: list[list[int]], out: list[int]) -> list[Constraint]:
    """Tie each input dim to the output dim it broadcasts to (sizes equal), skip size-1 dims."""
    cons: list[Constraint] = []
    rank = len(out)
    for atoms in inputs:
        if len(atoms) > rank:
            return ctx.freeze([a for xs in inputs for a in xs] + out, "broadcast of a larger rank")
        for i, a in enumerate(atoms):
            o = out[i + rank - len(atoms)]
            if ctx.size(a) == ctx.size(o):
                cons.append(Tie(a, o))
            elif ctx.size(a) != 1:
                return ctx.freeze([a for xs in inputs for a in xs] + out, "broadcast mismatch")
    return cons


@register_rule(*aten_ops(
    "abs", "neg", "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "hardtanh", "elu", "selu", "celu", "leaky_relu", "softplus", "mish", "clamp", "clamp_min",
    "clamp_max", "exp", "expm1", "log", "log1p", "log2", "sqrt", "rsqrt", "reciprocal", "erf",
    "erfc", "sin", "cos", "square", "sign", "pow", "logit", "threshold", "add", "sub", "mul", "div",
    "rsub", "maximum", "minimum", "where", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_not", "addcmul", "addcdiv",
    "lerp", "floor_divide", "remainder", "fmod", "floor", "ceil", "round", "trunc", "atan2",
    "clone", "alias", "contiguous", "detach", "lift_fresh_copy",
    "softmax", "_softmax", "log_softmax", "_log_softmax", "dropout", "isnan", "isinf",
    "nan_to_num", "hardshrink", "softshrink", "silu_backward", "sigmoid_backward", "fill",
    "copysign", "xlogy", "special_erfcx", "gelu_backward", "bitwise_and", "bitwise_or"))
def elementwise(ctx: RuleContext) -> list[Constraint]:
    """Elementwise (with broadcasting): each input dim is tied to the output dim it maps to."""
    out = ctx.out
    if not isinstance(out, list) or (out and not isinstance(out[0], int)):
        return ctx.freeze([a for xs in ctx.tensor_args() for a in xs], "elementwise op with a tuple output")
    return broadcast_to_out(ctx, ctx.tensor_args(), out)


@register_rule(*aten_ops("_to_copy", "to", "type_as"))
def cast(ctx: RuleContext) -> list[Constraint]:
    """dtype / device cast: the output is ``self``'s values; ``other`` only lends its dtype, so it is not tied."""
    x, out = ctx.atoms(ctx.arg("self")), ctx.out
    if not isinstance(out, list) or not isinstance(x, list) or len(x) != len(out):
        flat = [a for a in (out or []) if isinstance(a, int)]
        return ctx.freeze([a for xs in ctx.tensor_args() for a in xs] + flat, "cast with an unexpected shape")
    return ctx.tie_all(x, out)


@register_rule(*aten_ops(
    "zeros", "ones", "full", "empty", "scalar_tensor", "zeros_like", "ones_like", "full_like",
    "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "empty_strided", "zero"))
def constant_factory(ctx: RuleContext) -> list[Constraint]:
    """Constant-filled tensor: its value is the same at every index, so no dim is constrained."""
    return []


@register_rule(*aten_ops("arange", "rand", "randn", "randint", "rand_like", "randn_like",
                         "linspace", "eye", "bernoulli", "normal", "uniform", "native_dropout"))
def random_factory(ctx: RuleContext) -> list[Constraint]:
    """Index-valued or random tensor: every dim of the output (and inputs) is frozen."""
    out = ctx.out if isinstance(ctx.out, list) else []
    flat = [a for x in out for a in (x if isinstance(x, list) else [x])]
    return ctx.freeze(flat + [a for xs in ctx.tensor_args() for a in xs],
                      "values depend on position or randomness")
