"""Partial merging on the traced ATen graph: which dims are summed over, which groups meet
non-unit-local ops, and the literal sizes that widening changes (Partial Model Merging thesis,
../papers/004, section 3.3; DESIGN.md section 4, "Rewrites emit a real nn.Module").

The atom model says which number belongs to which group: `autoperm.analysis.Site` lists, per
graph node, the dims and layouts of every group. A widened node's new shape follows from those
layouts (`autoperm.rewrite.partial_widen.widen_dim`); `patch_sizes` rewrites the size arguments
of views, reshapes, expands, splits, slices, LayerNorm's ``normalized_shape``, GroupNorm's
channel and group counts and a depthwise conv's ``groups`` to match, and `check_shapes` runs the
emitted module and compares every node's shape with the expected one.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from itertools import accumulate
from typing import Any, Mapping

import torch

from ..analysis import Site
from ..frontend import TracedGraph, node_origin
from ..rules.base import rule_for
from ..spec import PermutationSpec
from .partial_widen import Extension, Layout, WidenError, widen_dim
from ..rules.base import packet_name as _packet

__all__ = ["param_layouts", "node_layouts", "contraction_dims", "patch_sizes", "check_shapes"]

_CONTRACT = {"linear", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum"}
_SAME_DIM = {"_to_copy", "clone", "contiguous", "alias", "detach", "to", "lift_fresh_copy", "slice", "narrow",
             "split", "split_with_sizes", "chunk", "unsafe_split", "cat", "zeros_like", "ones_like", "full_like",
             "empty_like"}
_NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}
_REDUCE = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "prod", "nansum", "linalg_vector_norm",
           "norm", "var_mean", "std_mean", "max", "min", "argmax", "argmin"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}


def _shape(node: torch.fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def param_layouts(spec: PermutationSpec) -> dict[str, dict[int, list[Layout]]]:
    """state_dict key -> dim -> the group layouts on it (tied aliases share their tensor's)."""
    out: dict[str, dict[int, list[Layout]]] = defaultdict(lambda: defaultdict(list))
    for g in spec.groups:
        for ax in g.axes:
            for key in [ax.tensor, *spec.tied.get(ax.tensor, [])]:
                out[key][ax.dim].append((g.name, ax.offset, ax.outer, g.size, ax.inner))
    return {k: dict(v) for k, v in out.items()}


def node_layouts(sites: Mapping[str, list[Site]], spec: PermutationSpec) -> dict[str, dict[int, list[Layout]]]:
    """graph node name -> dim -> the group layouts on that dim of its output."""
    sizes = {g.name: g.size for g in spec.groups}
    out: dict[str, dict[int, list[Layout]]] = defaultdict(lambda: defaultdict(list))
    for g, ss in sites.items():
        for s in ss:
            out[s.node][s.dim].append((g, s.offset, s.outer, sizes[g], s.inner))
    return {k: dict(v) for k, v in out.items()}


# --------------------------------------------------------------------------- contraction
def _dependent(tg: TracedGraph) -> set[torch.fx.Node]:
    """Nodes whose value depends on a user input (activations, not parameter expressions)."""
    dep = {n for n in tg.graph.nodes if n.op == "placeholder" and n.name in tg.user_inputs}
    for n in tg.graph.nodes:
        if n.op == "call_function" and any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _positions(user: torch.fx.Node, node: torch.fx.Node) -> list[int]:
    flat = []
    for i, a in enumerate(user.args):
        if a is node or (isinstance(a, (list, tuple)) and node in a):
            flat.append(i)
    return flat


def _moved_dim(user: torch.fx.Node, node: torch.fx.Node, dim: int) -> int | None:
    """The dim of ``user``'s output that ``node``'s ``dim`` becomes through a shape op, or None."""
    name = _packet(user)
    ins, outs = _shape(node), _shape(user)
    if user.target is operator.getitem or name in _SAME_DIM:
        return dim
    if ins is None or outs is None:
        return None
    rank = len(ins)
    if name == "unsqueeze":
        d = user.args[1] + len(outs) if user.args[1] < 0 else user.args[1]
        return dim + 1 if d <= dim else dim
    if name == "permute":
        dims = [d + rank if d < 0 else d for d in user.args[1]]
        return dims.index(dim)
    if name in ("transpose", "swapaxes"):
        a, b = (d + rank if d < 0 else d for d in user.args[1:3])
        return b if dim == a else a if dim == b else dim
    if name in ("t", "numpy_T", "mT") and rank >= 2:
        return rank - 1 - dim if name == "numpy_T" else {rank - 1: rank - 2, rank - 2: rank - 1}.get(dim, dim)
    if name in ("expand", "view", "reshape", "_unsafe_view") or name in _elementwise_names():
        if name in ("expand",) or name in _elementwise_names():
            return dim + len(outs) - rank if outs[dim + len(outs) - rank] == ins[dim] else None
        before = math.prod(int(s) for s in ins[:dim]) if all(isinstance(s, int) for s in ins[:dim]) else None
        for d2, s in enumerate(outs):
            if s == ins[dim] and all(isinstance(x, int) for x in outs[:d2]) and math.prod(outs[:d2]) == before:
                return d2
    return None


def _elementwise_names() -> set[str]:
    from ..rules.base import RULES

    return {getattr(op, "__name__", "") for op, e in RULES.items() if e.fn.__name__ == "elementwise"}


def _contracts(user: torch.fx.Node, node: torch.fx.Node, dim: int) -> bool | None:
    """Whether the op ``user`` sums over ``node``'s ``dim`` (None: cannot tell)."""
    name = _packet(user)
    pos = _positions(user, node)
    rank = len(_shape(node) or ())
    if name == "linear":
        return (1 in pos and dim == rank - 1) or (0 in pos and dim == rank - 1)
    if name.startswith("conv"):
        transposed = name.startswith("conv_transpose") or (name == "convolution" and bool(user.args[6]))
        if 1 in pos:
            return dim == (0 if transposed else 1)
        return 0 in pos and dim == rank - len(_shape(user.args[1]) or ()) + 1
    if name in ("matmul", "mm", "bmm", "addmm", "baddbmm"):
        first, second = (1, 2) if name in ("addmm", "baddbmm") else (0, 1)
        return (first in pos and dim == rank - 1) or (second in pos and dim == max(rank - 2, 0))
    if name == "einsum":
        from ..rules.dense import _einsum_terms

        ops = list(user.args[1])
        parsed = _einsum_terms(user.args[0], [len(_shape(o) or ()) for o in ops])
        if parsed is None:
            return None
        terms, out = parsed
        letters = {terms[i][dim] for i, o in enumerate(ops) if o is node}
        return any(c not in out for c in letters)
    return False


def contraction_dims(tg: TracedGraph, spec: PermutationSpec) -> tuple[dict[tuple[str, int], bool], dict[str, str]]:
    """``(key, dim) -> summed over?`` for every grouped parameter dim, and the groups that cannot
    be widened because a use is not understood or the roles conflict (a tied embedding read as an
    output head), with the reason. A parameter expression (ops on parameters only) is followed to
    the op that meets the activations."""
    dep = _dependent(tg)
    layouts = param_layouts(spec)
    found: dict[tuple[str, int], set] = defaultdict(set)
    bad: dict[str, str] = {}
    for ph in tg.graph.nodes:
        key = tg.state_keys.get(ph.name) if ph.op == "placeholder" else None
        if key not in layouts:
            continue
        for dim in layouts[key]:
            stack, seen = [(ph, dim)], set()
            while stack:
                node, d = stack.pop()
                for user in node.users:
                    if (user, d) in seen or user.op != "call_function":
                        continue
                    seen.add((user, d))
                    if user in dep:
                        flag = _contracts(user, node, d) if _packet(user) in _CONTRACT else (
                            False if rule_for(user.target) is not None else None)
                        found[(key, dim)].add(flag if flag is None else bool(flag))
                        if flag is None:
                            found[(key, dim)].add(f"{_packet(user) or user.target} at {node_origin(user)}")
                        continue
                    moved = _moved_dim(user, node, d)
                    if moved is None:
                        found[(key, dim)].add(None)
                        found[(key, dim)].add(f"{_packet(user) or user.target} at {node_origin(user)}")
                    else:
                        stack.append((user, moved))
    out: dict[tuple[str, int], bool] = {}
    for (key, dim), flags in found.items():
        bools = {f for f in flags if isinstance(f, bool)}
        notes = sorted(f for f in flags if isinstance(f, str))
        reason = None
        if None in flags:
            reason = f"cannot tell whether {key!r} dim {dim} is summed over ({', '.join(notes)})"
        elif len(bools) > 1:
            reason = f"{key!r} dim {dim} is summed over by one use and not by another (tied roles)"
        if reason:
            for g, *_ in layouts[key][dim]:
                bad.setdefault(g, reason)
        out[(key, dim)] = bools == {True}
    return out, bad


# --------------------------------------------------------------------------- literals
def _new_shape(node_name: str, old: tuple, lays: Mapping[str, Mapping[int, list[Layout]]],
               ext: Mapping[str, Extension]) -> list:
    shape = list(old)
    for d, ls in lays.get(node_name, {}).items():
        shape[d] = int(widen_dim(int(old[d]), ls, ext)[0].numel())
    return shape


def _boundary(node_name: str, dim: int, old: tuple, lays, ext):
    ls = lays.get(node_name, {}).get(dim)
    if not ls:
        return lambda b: b
    origin = widen_dim(int(old[dim]), ls, ext)[3]
    n = int(old[dim])
    return lambda b: b if b > n else origin.numel() if b == n else int((origin < b).sum())


def patch_sizes(graph: torch.fx.Graph, tg: TracedGraph, lays: Mapping[str, Mapping[int, list[Layout]]],
                ext: Mapping[str, Extension]) -> dict[str, list]:
    """Rewrite, in place, the literal sizes of ``graph`` (a copy of ``tg.graph`` from
    `autoperm.rewrite.emit.graph_from_traced`) for the widened groups. Returns the expected new
    shape of every tensor-valued node (symbolic sizes kept) for `check_shapes`."""
    old = {n.name: _shape(n) for n in tg.graph.nodes}
    expected = {name: _new_shape(name, shp, lays, ext) for name, shp in old.items() if shp is not None}
    old_nodes = {new: orig for orig, new in zip(tg.graph.nodes, graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        name = _packet(node)
        args = list(node.args)
        src = old_nodes.get(args[0]) if args and isinstance(args[0], torch.fx.Node) else None
        src_old = old.get(src.name) if src is not None else None
        new = expected.get(old_nodes[node].name)
        if name in ("view", "_unsafe_view", "reshape", "expand") and new is not None and len(args[1]) == len(new):
            sizes = [_literal(s, n) for s, n in zip(args[1], new)]
            if name != "expand" and sizes != list(args[1]):
                node.target = torch.ops.aten.reshape.default   # the widened input may not be viewable
            args[1] = sizes
        elif name in ("zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full", "new_empty") and new:
            i = 1 if name.startswith("new_") else 0
            args[i] = [_literal(s, n) for s, n in zip(args[i], new)]
        elif name in ("split", "split_with_sizes") and src_old is not None:
            dim = (args[2] if len(args) > 2 else 0) % len(src_old)
            sizes = args[1]
            if isinstance(sizes, int):
                full = int(src_old[dim])
                sizes = [min(sizes, full - i) for i in range(0, full, sizes)]
            cuts = [0, *accumulate(sizes)]
            f = _boundary(src.name, dim, src_old, lays, ext)
            new_sizes = [f(b) - f(a) for a, b in zip(cuts, cuts[1:])]
            node.target = torch.ops.aten.split_with_sizes.default
            args = [args[0], new_sizes, dim]
        elif name in ("slice", "narrow") and src_old is not None:
            dim = args[1] % len(src_old) if len(args) > 1 else 0
            f = _boundary(src.name, dim, src_old, lays, ext)
            if name == "slice" and len(args) > 3:
                start = args[2] if args[2] is not None else 0
                args[2], args[3] = f(start), f(args[3]) if args[3] is not None else None
            elif name == "narrow":
                start = f(args[2])
                args[2], args[3] = start, f(args[2] + args[3]) - start
        elif name in _NORMS and src_old is not None:
            k = len(args[1])
            args[1] = [int(x) for x in expected[src.name][len(src_old) - k:]]
        elif name == "group_norm" and src_old is not None and args[1] == src_old[1]:
            args[1] = expected[src.name][1]
        elif name == "native_group_norm" and src_old is not None:
            if args[6] == args[4]:
                args[6] = expected[src.name][1]
            args[4] = expected[src.name][1]
        elif name.startswith("conv") and src_old is not None:
            gi = 8 if name == "convolution" else 6
            if len(args) > gi and args[gi] > 1 and args[gi] == src_old[1]:
                args[gi] = expected[src.name][1]   # depthwise: one group per channel
        node.args = tuple(args)
    return expected


def _literal(old: Any, new: Any) -> Any:
    """A size argument after widening: integers (not -1) become the new static size."""
    if isinstance(old, int) and old != -1 and isinstance(new, int):
        return new
    return old


def check_shapes(tg_w: TracedGraph, old_of: Mapping[str, str], state: Mapping[str, torch.Tensor], inputs,
                 expected: Mapping[str, list], lays: Mapping[str, Mapping[int, list[Layout]]]) -> None:
    """Run the widened graph ``tg_w`` with ``state`` and compare each node's output shape with
    ``expected`` (static dims; keyed by the original node names, ``old_of`` maps to them); raise
    `WidenError` naming the node and the groups there."""
    seen: dict[str, tuple] = {}
    current: list[torch.fx.Node] = []

    class _Shapes(torch.fx.Interpreter):
        def run_node(self, n):
            current[:] = [n]
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and n.op == "call_function":
                seen[old_of.get(n.name, n.name)] = tuple(out.shape)
            return out

    user = iter(inputs)
    args = [state[tg_w.state_keys[n.name]] if n.name in tg_w.state_keys else
            tg_w.constants[n.name] if n.name in tg_w.constants else next(user)
            for n in tg_w.graph.nodes if n.op == "placeholder"]
    try:
        with torch.no_grad():
            _Shapes(tg_w.graph_module).run(*args)
    except Exception as e:
        node = current[0] if current else None
        names = [node.name, *(a.name for a in node.all_input_nodes)] if node is not None else []
        names = [old_of.get(nm, nm) for nm in names]
        groups = sorted({g for nm in names for ls in lays.get(nm, {}).values() for g, *_ in ls})
        head = (str(e).strip().splitlines() or [""])[0][:160]
        where = f"{node.name} ({node_origin(node)})" if node is not None else "?"
        raise WidenError(f"the widened graph fails at {where}: {type(e).__name__}: {head}", groups) from e
    for name, shape in seen.items():
        want = expected.get(name)
        if want is None or len(want) != len(shape):
            continue
        if any(isinstance(w, int) and w != s for w, s in zip(want, shape)):
            groups = sorted({g for ls in lays.get(name, {}).values() for g, *_ in ls})
            raise WidenError(f"node {name} has shape {list(shape)} after widening, expected {want}", groups)
