"""Folding PFM's merge nodes into weights (`autoperm.rewrite.pfm`).

A merge node computes ``(1 - alpha) * a + alpha * b`` from the two preserved copies. Where the
merged value ``a`` is produced by an affine op scaled linearly by its weights (a conv / linear, or
a BatchNorm / LayerNorm with weight and bias) followed only by positively homogeneous, per-element
or shape ops (ReLU, LeakyReLU, max / average pooling, views, flatten, permutes), scaling that op's
weight and bias by ``c > 0`` scales ``a`` by ``c``: so model_a's copy gets its weights scaled by
``1 - alpha`` and model_b's by ``alpha``, and the merge node becomes a plain ``add``. The function
is unchanged (the emitted module is checked against the unfolded reference).

The coefficients go into the last preserved layer rather than the next merged one: folding them
into the next layer would need that layer to read both copies (twice its input width). Nothing
is folded at ``alpha`` 0 or 1, through ReLU6 / GELU / SiLU (not homogeneous), or where a chain
value or a weight has another reader (scaling it would change that reader too).

Example::

    plan = fold_plan(tg, preserved_nodes(tg, 3), alpha=0.5)
    plan   # {'relu_2': ['features.4.weight', 'features.4.bias']}: merge of relu_2 is an add
"""

from __future__ import annotations

import operator

import torch

from ..frontend import TracedGraph
from ..rules.base import packet_name as _packet

__all__ = ["fold_plan", "scale_folded"]

_AFFINE = {"linear": (1, 2), "conv1d": (1, 2), "conv2d": (1, 2), "conv3d": (1, 2), "convolution": (1, 2),
           "_native_batch_norm_legit_no_training": (1, 2), "layer_norm": (2, 3), "native_layer_norm": (2, 3)}
_HOMOGENEOUS = {"relu", "leaky_relu", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
                "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                "adaptive_avg_pool3d", "view", "_unsafe_view", "reshape", "flatten", "permute", "transpose",
                "clone", "contiguous", "alias", "squeeze", "unsqueeze", "dropout", "identity"}


def _is_float(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _param(tg: TracedGraph, node, arg: int):
    """The state key of the placeholder at ``node.args[arg]`` if only ``node`` reads it; ``""``
    when the argument is absent (a conv without bias); None when it cannot be scaled alone."""
    if len(node.args) <= arg or node.args[arg] is None:
        return ""
    p = node.args[arg]
    if not isinstance(p, torch.fx.Node) or p.op != "placeholder" or p.name not in tg.state_keys:
        return None
    return tg.state_keys[p.name] if len(p.users) == 1 else None


def _affine_source(tg: TracedGraph, node: torch.fx.Node, preserved: set) -> list[str] | None:
    """Walk back from ``node`` through single-reader homogeneous ops to an affine op; its weight
    and bias keys, or None."""
    cur, first = node, True
    while True:
        if cur not in preserved or cur.op != "call_function" or (not first and len(cur.users) != 1):
            return None
        first = False
        name = _packet(cur)
        if cur.target is operator.getitem:
            src, idx = cur.args
            if idx != 0 or not isinstance(src, torch.fx.Node):
                return None
            if _packet(src) in _AFFINE or _packet(src) == "max_pool2d_with_indices":
                if any(u.target is not operator.getitem or u.args[1] != 0 for u in src.users):
                    return None  # another output of the op (indices, statistics) is read
                cur = src
                continue
            return None
        if name in _AFFINE:
            w_arg, b_arg = _AFFINE[name]
            keys = [_param(tg, cur, w_arg), _param(tg, cur, b_arg)]
            if keys[0] in (None, "") or keys[1] is None:
                return None  # no weight to scale (BatchNorm without affine) or a shared one
            return [k for k in keys if k]
        if name not in _HOMOGENEOUS:
            return None
        ins = [p for p in cur.all_input_nodes if _is_float(p) and (p.op != "placeholder" or p.name in tg.user_inputs)]
        if len(ins) != 1:
            return None
        cur = ins[0]


def fold_plan(tg: TracedGraph, preserved: set[torch.fx.Node], alpha: float) -> dict[str, list[str]]:
    """For each merge node that can be folded, keyed by the preserved node it merges: the state
    keys to scale (by ``1 - alpha`` in model_a's copy and ``alpha`` in model_b's)."""
    if not 0.0 < float(alpha) < 1.0:
        return {}
    plan: dict[str, list[str]] = {}
    used: set[str] = set()
    for node in tg.graph.nodes:
        if node not in preserved or not any(u not in preserved for u in node.users):
            continue
        if any(u in preserved for u in node.users):
            continue  # the preserved part reads it too: scaling would change that reader
        if not _is_float(node):
            continue
        keys = _affine_source(tg, node, preserved)
        if keys and not used & set(keys):
            plan[node.name] = keys
            used |= set(keys)
    return plan


def scale_folded(tensors: dict[str, torch.Tensor], plan: dict[str, list[str]], alpha: float) -> None:
    """Scale, in ``tensors`` (keyed ``"<context>.<state key>"``), model_a's copies of the planned
    weights by ``1 - alpha`` and model_b's by ``alpha`` (new tensors; the inputs are not modified)."""
    for keys in plan.values():
        for key in keys:
            for ctx, c in (("model_a", 1.0 - float(alpha)), ("model_b", float(alpha))):
                tensors[f"{ctx}.{key}"] = tensors[f"{ctx}.{key}"] * c
