"""Normalization layers: BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm.

Each keeps one statistic per channel (BatchNorm, InstanceNorm) or over a set of dims (LayerNorm,
RMSNorm) that is symmetric in its members, so permuting the channel dim of the input permutes the
output the same way, provided the affine parameters and running statistics follow. GroupNorm's
statistics are per group of consecutive channels, so its channel dim is ``prod(group, within)``:
whole groups may move, and channels within a group (one permutation shared by all groups).
"""

from __future__ import annotations

from ..ir import Compose, Constraint, Tie
from .base import RuleContext, aten_ops, register_rule
from .pointwise import broadcast_to_out


def _per_channel(ctx: RuleContext, x: list[int], outs: list, params: list) -> list[Constraint]:
    cons: list[Constraint] = []
    c = x[1] if len(x) >= 2 else x[0]
    for o in outs:
        if o is None:
            continue
        if len(o) == len(x):
            cons += ctx.tie_all(x, o)
        elif len(o) == 1 and ctx.size(o[0]) == ctx.size(c):  # saved per-channel statistics
            cons.append(Tie(o[0], c))
    for p in params:
        if p is not None and len(p) == 1:
            cons.append(Tie(p[0], c))
    return cons


@register_rule(*aten_ops("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                         "native_batch_norm", "_native_batch_norm_legit_functional", "instance_norm"))
def batch_norm(ctx: RuleContext) -> list[Constraint]:
    """Batch / instance norm: weight, bias and running statistics follow channel dim 1."""
    x = ctx.atoms(ctx.arg("input"))
    outs = ctx.out if isinstance(ctx.out[0], list) else [ctx.out]
    params = [ctx.atoms(ctx.arg(n)) for n in ("weight", "bias", "running_mean", "running_var")]
    return _per_channel(ctx, x, outs, params)


@register_rule(*aten_ops("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"))
def layer_norm(ctx: RuleContext) -> list[Constraint]:
    """Layer / RMS norm over the last dims: symmetric statistics, affine params on those dims."""
    x = ctx.atoms(ctx.arg("input"))
    outs = ctx.out if isinstance(ctx.out[0], list) else [ctx.out]
    k = len(ctx.arg("normalized_shape"))
    cons: list[Constraint] = ctx.tie_all(x, outs[0])
    for stat in outs[1:]:  # mean / rstd: leading dims kept, normalized dims of size 1
        if stat is not None and len(stat) == len(x):
            cons += [Tie(a, b) for a, b in zip(x[:-k], stat[:-k])]
    for name in ("weight", "bias"):
        p = ctx.atoms(ctx.arg(name))
        if p is not None:
            cons += ctx.tie_all(p, x[len(x) - len(p):])
    return cons


def _group_norm(ctx: RuleContext, groups: int, outs: list) -> list[Constraint]:
    x = ctx.atoms(ctx.arg("input"))
    c = x[1]
    group = ctx.fresh(groups)
    cons: list[Constraint] = [Compose(c, "prod", (group, ctx.fresh(ctx.size(c) // groups)))]
    cons += ctx.tie_all(x, outs[0])
    for stat in outs[1:]:  # native_group_norm's mean / rstd are (N, groups)
        if stat is not None and len(stat) == 2:
            cons += [Tie(stat[0], x[0]), Tie(stat[1], group)]
    for name in ("weight", "bias"):
        p = ctx.atoms(ctx.arg(name))
        if p is not None:
            cons.append(Tie(p[0], c))
    return cons


@register_rule(*aten_ops("group_norm"))
def group_norm(ctx: RuleContext) -> list[Constraint]:
    """Group norm: channels are ``prod(group, within)``; affine params follow the channels."""
    return _group_norm(ctx, int(ctx.arg("num_groups")), [ctx.out])


@register_rule(*aten_ops("native_group_norm"))
def native_group_norm(ctx: RuleContext) -> list[Constraint]:
    """Native group norm (tuple output): as group_norm, with per-group statistics."""
    return _group_norm(ctx, int(ctx.arg("group")), list(ctx.out))


@register_rule(*aten_ops("_weight_norm"))
def weight_norm(ctx: RuleContext) -> list[Constraint]:
    """Weight normalization ``w = g * v / ||v||``, the norm over every dim of v but ``dim``
    (`torch.nn.utils.parametrizations.weight_norm`): permuting ``dim`` permutes the norms with
    v and g; permuting another dim leaves each norm (a sum of squares over it) unchanged. So
    every dim of v follows the output's, and g (size 1 off ``dim``) broadcasts to it."""
    v, g, out = ctx.atoms(ctx.arg("v")), ctx.atoms(ctx.arg("g")), ctx.out
    if v is None or len(v) != len(out):
        return ctx.freeze((v or []) + (g or []) + out, "weight norm of an unexpected shape")
    return ctx.tie_all(v, out) + (broadcast_to_out(ctx, [g], out) if g is not None else [])
