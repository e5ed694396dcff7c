"""A graph pass: a fused projection viewed into a stack of slices becomes separate slices.

A fused qkv projection is written ``linear(x) -> view(B, N, 3, H, D) -> permute -> unbind(0)``
(timm's ViT) or ``linear -> unflatten(3, E) -> unsqueeze / transpose / squeeze -> select(0, i)``
(``nn.MultiheadAttention``). Per dim atoms cannot say that q, k and v may use *different*
head_dim permutations: after the view all three slices share the atoms of ``H`` and ``D``, so
one head_dim group would cover q, k, v and the output projection (sound, but coarser than the
true symmetry). This pass rewrites the pattern into ``split_with_sizes`` of the projection
followed by the same chain of layout ops per slice, so each slice gets its own atoms: q and k
end up sharing one head_dim group, v and the output projection another (DESIGN.md section 3).

The rewrite computes exactly the same values (only layout ops are replayed per slice), so the
spec is still checked against the caller's model. Walking back from an ``unbind`` (or a set of
``select`` nodes on one dim) it accepts only single-user chains of ``permute``, ``transpose``,
``clone``, ``alias``, ``unsqueeze``, ``squeeze`` and ``view`` that keep the stacked dim whole,
ending at the ``view`` that split the dim off; anything else leaves the graph unchanged.

Example (on an exported ATen graph module)::

    n = split_stacked(ep.graph_module)   # number of stacks split, 0 if none matched
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)
aten = torch.ops.aten

__all__ = ["split_stacked"]

_PASS = {aten.clone.default, aten.alias.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _size(s: Any) -> Any:
    if isinstance(s, torch.SymInt):
        return s.node.expr
    return int(s)


def _shape(node: Node) -> list[Any] | None:
    val = node.meta.get("val")
    return [_size(s) for s in val.shape] if isinstance(val, torch.Tensor) else None


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0)
    except (TypeError, sympy.SympifyError):
        return False


def _prod(xs: list[Any]) -> Any:
    out: Any = 1
    for x in xs:
        out = out * x
    return out


@dataclass
class _Step:
    node: Node   # the op in the original chain
    d_in: int    # stacked dim in its input
    d_out: int   # stacked dim in its output


def _terminal(node: Node) -> tuple[Node, int, dict[int, list[Node]]] | None:
    """(stacked value, dim, {slice index: nodes to replace}) for an unbind or a group of selects."""
    if node.target is aten.unbind.int:
        x = node.args[0]
        rank = len(_shape(x) or [])
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        d = d + rank if d < 0 else d
        if not all(u.target is operator.getitem for u in node.users):
            return None
        uses: dict[int, list[Node]] = {}
        for u in node.users:
            uses.setdefault(u.args[1], []).append(u)
        return x, d, uses
    if node.target is aten.select.int:
        x = node.args[0]
        shape = _shape(x)
        if shape is None or not all(u.target is aten.select.int for u in x.users):
            return None
        dims = {(u.args[1] + len(shape)) % len(shape) for u in x.users}
        if len(dims) != 1 or min(x.users, key=lambda n: n.name) is not node:  # handle each group once
            return None
        d = dims.pop()
        t = shape[d]
        uses = {}
        for u in x.users:
            if not isinstance(u.args[2], int):
                return None
            uses.setdefault(u.args[2] % t if isinstance(t, int) else u.args[2], []).append(u)
        return x, d, uses
    return None


def _back(node: Node, d: int) -> tuple[list[_Step], Node, int, int] | None:
    """Walk from the stacked value back to the view that split the dim off.

    Returns (chain from the origin view to ``node``, the view's input, the input dim split,
    the view's output stacked dim), or None when the chain holds anything else."""
    chain: list[_Step] = []
    cur = node
    while True:
        if cur.op != "call_function" or not cur.args or not isinstance(cur.args[0], Node):
            return None
        if chain and len(cur.users) != 1:  # every op upstream of the stacked value feeds only the chain
            return None
        x, tgt = cur.args[0], cur.target
        s_in = _shape(x)
        if s_in is None:
            return None
        rank_in = len(s_in)
        if tgt is aten.permute.default:
            d_in = [p % rank_in for p in cur.args[1]][d]
        elif tgt is aten.transpose.int:
            a, b = cur.args[1] % rank_in, cur.args[2] % rank_in
            d_in = b if d == a else a if d == b else d
        elif tgt in _PASS:
            d_in = d
        elif tgt is aten.unsqueeze.default:
            k = cur.args[1] % (rank_in + 1)
            if k == d:
                return None
            d_in = d - (1 if k < d else 0)
        elif tgt in (aten.squeeze.dim, aten.squeeze.dims):
            ks = cur.args[1] if isinstance(cur.args[1], (list, tuple)) else [cur.args[1]]
            gone = {k % rank_in for k in ks if _equal(s_in[k % rank_in], 1)}
            d_in = [i for i in range(rank_in) if i not in gone][d]
        elif tgt in _VIEWS:
            s_out = _shape(cur)
            prefix, t = _prod(s_out[:d]), s_out[d]
            p = next((i for i in range(rank_in) if _equal(_prod(s_in[:i]), prefix)), None)
            if p is None:
                return None
            if _equal(s_in[p], t):
                d_in = p
            elif any(_equal(_prod(s_out[d:k]), s_in[p]) for k in range(d + 2, len(s_out) + 1)):
                chain.append(_Step(cur, p, d))  # the origin: dim p is split into (t, ...) slices
                return list(reversed(chain)), x, p, d
            else:
                return None
        else:
            return None
        chain.append(_Step(cur, d_in, d))
        cur, d = x, d_in


def _set_val(node: Node) -> None:
    args = tree_map(lambda a: a.meta["val"] if isinstance(a, Node) else a, (node.args, node.kwargs))
    node.meta["val"] = node.target(*args[0], **args[1])


def _replay(graph, step: _Step, src: Node) -> Node:
    """``step``'s op applied to one slice (the stacked dim removed)."""
    n, di, do = step.node, step.d_in, step.d_out
    tgt = n.target
    if tgt in _VIEWS:
        shape = list(n.args[1])
        del shape[do]
        args: tuple = (src, shape)
    elif tgt in (aten.permute.default, aten.transpose.int):
        rank_in = len(_shape(n.args[0]))
        if tgt is aten.transpose.int:
            a, b = n.args[1] % rank_in, n.args[2] % rank_in
            perm = list(range(rank_in))
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = [p % rank_in for p in n.args[1]]
        perm = [p - (1 if p > di else 0) for p in perm if p != di]
        if perm == list(range(len(perm))):
            return src
        tgt, args = aten.permute.default, (src, perm)
    elif tgt is aten.unsqueeze.default:
        k = n.args[1] % (len(_shape(n.args[0])) + 1)
        args = (src, k - (1 if k > do else 0))
    elif tgt in (aten.squeeze.dim, aten.squeeze.dims):
        rank_in = len(_shape(n.args[0]))
        ks = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        ks = [k % rank_in - (1 if k % rank_in > di else 0) for k in ks if k % rank_in != di]
        tgt, args = aten.squeeze.dims, (src, ks)
    else:
        args = (src, *n.args[1:])
    with graph.inserting_before(n):  # after every argument of the original op
        new = graph.call_function(tgt, args, dict(n.kwargs) if tgt is n.target else {})
    new.meta = {k: v for k, v in n.meta.items() if k != "val"}
    _set_val(new)
    return new


def split_stacked(gm: GraphModule) -> int:
    """Rewrite every matched stack of slices in ``gm`` in place; return how many were split."""
    done = 0
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False) or node.op != "call_function":
            continue
        term = _terminal(node)
        if term is None:
            continue
        stacked, d, uses = term
        back = _back(stacked, d)
        if back is None:
            continue
        chain, src, p, _ = back
        t = _shape(stacked)[d]
        width = _shape(src)[p]
        if not isinstance(t, int) or not isinstance(width, int) or width % t or t < 2:
            continue
        graph = gm.graph
        with graph.inserting_before(chain[0].node):
            split = graph.call_function(aten.split_with_sizes.default, (src, [width // t] * t, p))
        split.meta = {k: v for k, v in chain[0].node.meta.items() if k != "val"}
        _set_val(split)
        for i, targets in uses.items():
            with graph.inserting_before(chain[0].node):
                piece = graph.call_function(operator.getitem, (split, i))
            piece.meta = dict(split.meta)
            _set_val(piece)
            cur = piece
            for step in chain:
                cur = _replay(graph, step, cur)
            for old in targets:
                old.replace_all_uses_with(cur)
        for old in dict.fromkeys([u for targets in uses.values() for u in targets] + [node]):
            if not old.users:
                graph.erase_node(old)
        for step in reversed(chain):
            if not step.node.users:
                graph.erase_node(step.node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
        log.info("split %d stacked projection(s) into per-slice chains", done)
    return done
