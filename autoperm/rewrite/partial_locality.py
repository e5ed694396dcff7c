"""Which widened groups meet non-unit-local ops (partial merging, ../papers/004 chapter 3).

``partial=1`` gives the ensemble only where every op a widened group's units meet acts on each
unit alone. `locality` lists, per group, the ops that do not (LayerNorm / RMSNorm over the
units, GroupNorm with several channels per group, softmax or a reduction over the units, a
parameter or bias that is one value shared by all units), so that the gap is measured and
reported; and the groups that cannot be widened at all (units summed over in a product of two
activations, cosine similarity or cdist; a grouped conv / GroupNorm whose group count would
have to change).

Example::

    nonlocal_, frozen = locality(tg, sites)   # {'blocks.0.attn': ['softmax over the units']}, {}
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch

from ..analysis import Site
from ..frontend import TracedGraph, node_origin
from ..rules.base import packet_name as _packet
from .partial_graph import (_CONTRACT, _NORMS, _REDUCE, _SOFTMAX, _contracts, _dependent, _positions,
                            _shape)

__all__ = ["locality"]


def locality(tg: TracedGraph, sites: Mapping[str, list[Site]]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Per group, the non-unit-local ops its widened units would meet (LayerNorm / RMSNorm,
    GroupNorm with several channels per group, softmax or a reduction over the units), and the
    groups that cannot be widened at all: units summed over in a product of two activations
    (attention's q.k head_dim: widening changes the scores and the 1/sqrt(d) scale), or a grouped
    conv / GroupNorm whose group count would have to change."""
    dep = _dependent(tg)
    params = _parameter_nodes(tg, dep)
    nodes = {n.name: n for n in tg.graph.nodes}
    nonlocal_: dict[str, list[str]] = defaultdict(list)
    frozen: dict[str, str] = {}
    for g, ss in sites.items():
        for s in ss:
            node = nodes[s.node]
            rank = len(_shape(node) or ())
            bias = _shared_bias(node, s, rank, params)
            if bias and bias not in nonlocal_[g]:
                nonlocal_[g].append(bias)
            for user in node.users:
                why, hard = _nonlocal(user, node, s, rank, dep)
                if not why:
                    why, hard = _shared_parameter(user, node, s, rank, params), False
                if hard:
                    frozen.setdefault(g, f"{why} at {node_origin(user)}")
                elif why and why not in nonlocal_[g]:
                    nonlocal_[g].append(why)
    return dict(nonlocal_), frozen


def _parameter_nodes(tg: TracedGraph, dep: set) -> set[torch.fx.Node]:
    """Nodes computed from parameters / buffers alone (not from a user input): values that
    differ between model_a and model_b."""
    out = {n for n in tg.graph.nodes if n.op == "placeholder" and n.name in tg.state_keys}
    for n in tg.graph.nodes:
        if n.op == "call_function" and n not in dep and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _broadcast_over(param: torch.fx.Node, d: int, rank: int) -> bool:
    """Whether ``param`` broadcasts over dim ``d`` of a rank-``rank`` value (missing or size 1 there)."""
    shape = _shape(param)
    if shape is None:
        return False
    k = d - (rank - len(shape))
    return k < 0 or shape[k] == 1


def _shared_parameter(user, node, s: Site, rank: int, params: set) -> str | None:
    """A pointwise ``user`` combining the units with a parameter that is one value for all of
    them (``x * self.scale`` with a 0-dim scale): widened, A's and B's own units would share the
    interpolated value, so ``partial=1`` is not the ensemble."""
    if _packet(user) in _CONTRACT or len(_shape(user) or ()) != rank:
        return None
    for a in user.all_input_nodes:
        if a is not node and a in params and _broadcast_over(a, s.dim, rank):
            return "a parameter shared by all units (broadcast over them)"
    return None


def _shared_bias(node, s: Site, rank: int, params: set) -> str | None:
    """The same for the bias of the conv / linear producing the units (F.linear with a
    one-element bias)."""
    name = _packet(node)
    pos = {"linear": 2, "addmm": 0}.get(name, 2 if name.startswith("conv") else None)
    if pos is None or len(node.args) <= pos or not isinstance(node.args[pos], torch.fx.Node):
        return None
    bias = node.args[pos]
    if bias not in params:
        return None
    shape = _shape(bias)
    unit_dim = 1 if name.startswith("conv") else rank - 1
    if s.dim != unit_dim or shape is None or (len(shape) == 1 and shape[0] == (_shape(node) or ())[s.dim]):
        return None
    return "a bias shared by all units (one element, broadcast)"


def _nonlocal(user, node, s: Site, rank: int, dep) -> tuple[str | None, bool]:
    name = _packet(user)
    d = s.dim
    if name in ("cosine_similarity", "cdist"):
        others = [a for a in user.all_input_nodes if a is not node]
        dim = (user.args[2] if len(user.args) > 2 else 1) if name == "cosine_similarity" else -1
        hit = d == int(dim) % rank if rank else False
        return (f"{name} sums over these units with another value (widening changes it)" if hit and others
                else None), bool(hit and others)
    if name in _NORMS:
        k = len(user.args[1])
        return ("LayerNorm / RMSNorm over the units" if d >= rank - k else None), False
    if name in ("group_norm", "native_group_norm"):
        groups = int(user.args[1] if name == "group_norm" else user.args[6])
        channels = (_shape(node) or (0, 0))[1]
        if d != 1 or groups == channels:
            return None, False
        if groups > 1 and s.outer % groups:
            return "widening would change GroupNorm's group count", True
        return "GroupNorm over several units", False
    if name.startswith("conv") and _positions(user, node) == [0] and d == 1:
        groups = int(user.args[8] if name == "convolution" else (user.args[6] if len(user.args) > 6 else 1))
        channels = (_shape(node) or (0, 0))[1]
        if 1 < groups < channels and s.outer % groups:
            return "widening would change a grouped conv's group count", True
        return None, False
    if name in _SOFTMAX:
        return ("softmax over the units" if (user.args[1] % rank) == d else None), False
    if name in _REDUCE:
        dims = user.args[1] if len(user.args) > 1 else None
        dims = list(range(rank)) if dims is None or dims == [] else [dims] if isinstance(dims, int) else list(dims)
        return ("reduction over the units" if d in {x % rank for x in dims} else None), False
    if name in ("matmul", "mm", "bmm", "einsum", "scaled_dot_product_attention"):
        others = [a for a in user.all_input_nodes if a is not node and a in dep]
        if not others:
            return None, False
        if name == "scaled_dot_product_attention":
            pos = _positions(user, node)
            hit = bool({0, 1} & set(pos)) and d == rank - 1
            return ("attention q.k sums over these units (head_dim)" if hit else None), hit
        if _contracts(user, node, d):
            return "a product of two activations sums over these units (q.k)", True
    return None, False


