"""Hierarchical groups: a child group (head_dim) that may take one permutation per slot of its
parent group (heads), proven from the traced graph (DESIGN.md section 3, "hierarchical groups").

The flat analysis gives heads one permutation and head_dim another, shared by every head. Each
head's q / k (and v / o) head_dim may in fact be permuted on its own: attention never mixes the
head_dim features of different heads. This pass proves that per child leaf class ``L`` and
candidate parent leaf class ``P`` (both permutable), and gives up (the child stays shared, which
is always sound) unless all of the following hold:

1. *Every value that holds L has a head coordinate.* In each tensor value (node outputs and
   placeholders) that holds slots of L, L sits in one dim, and every L slot has exactly one P
   coordinate: P in the same dim with each L chunk inside one P slot (a flattened ``heads *
   head_dim``), or P alone in one other dim (``(B, heads, N, head_dim)``). A value with L and no P
   (a ``LayerNorm(head_dim)`` weight shared by the heads, a mean over heads, a key broadcast to all
   heads) forces one permutation for all heads.
2. *Every op that touches such a value is head-local.* Its rule is in `LOCAL_RULES`
   (elementwise, casts, views, dim reorders, linear / matmul / attention, convolution, batch and
   layer norm, reductions, cat / split / select / getitem; einsum is not trusted), and within the
   op the P dims of all its L-holding values are joined by the op's own constraints (so an
   output element of head h reads only head h's inputs). A product (linear, matmul, attention, convolution, batch norm)
   pairs slots by argument role, which atoms cannot show when one value fills two roles
   (``sdpa(t, t, t)`` with the heads as the sequence, ``linear(m, m)``): there the parent must
   sit in the child's own dim or in a batch dim of every operand holding the child, never in a
   dim the product mixes (review finding; tests/test_hierarchy.py).
3. *No op mixes along P separately from L.* A softmax or layer norm over the heads dim with
   head_dim elsewhere reads other heads' features (over both together it is symmetric, so fine).
   Reductions need no check: a sum over heads that keeps head_dim fails 1.

The same holds for a grouped convolution's within-group output units (child) and its group index
(parent): output unit (g, u) reads only group g's inputs and weight row (g, u).

Then each op is equivariant under one head_dim permutation per head: restricted to one head, it
is the shared-permutation case the flat rules already prove. Parameters must also hold the child
in a layout `autoperm.spec` can name: each child axis's outer index ``k`` lies in parent slot
``k // (outer / parent.size)``.

Example::

    tg = capture(attention_model, x)
    spec = analyze(tg, hierarchical=True)
    [(g.name, g.parent) for g in spec.groups if g.parent]   # [('q_proj#1', 'q_proj'), ...]
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Iterable

import torch

from .errors import SpecError
from .ir import AtomTable, Compose, Constraint, Tie
from .rules.base import packet_name, rule_for
from .spec import block_slots, chunks_by_parent, slot_coordinates

__all__ = ["LOCAL_RULES", "find_children"]

log = logging.getLogger(__name__)

# Rules (by function name) whose ops compute each output element of head h from head h's inputs
# once their P dims are joined (condition 2). A user rule that replaces one of them is not trusted.
LOCAL_RULES = frozenset({
    "elementwise", "cast", "reshape", "reorder", "expand", "linear", "matmul", "addmm", "sdpa", "getitem",
    "cat", "stack", "split", "unbind", "select", "slice_", "narrow", "reduction", "layer_norm",
    "conv", "convolution", "batch_norm",
})
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}


class _Bad(Exception):
    """The candidate pair fails; the message says where (logged at debug level)."""


def _tensors(val: Any) -> Iterable[list[int]]:
    """Each tensor's atom list in a node value (tuples flattened)."""
    if isinstance(val, list) and all(isinstance(a, int) for a in val):
        yield val
    elif isinstance(val, list):
        for v in val:
            yield from _tensors(v)


class _Layouts:
    """Blocks per atom, cached: ``(size, [(leaf, offset, outer, size, inner), ...])`` (sizes and
    blocks only for integer sizes); and the leaf classes in an atom's structure, for any size."""

    def __init__(self, table: AtomTable, frozen: dict[int, str]):
        self.table, self.frozen, self.cache, self._leaves = table, frozen, {}, {}

    def leaves(self, atom: int) -> frozenset[int]:
        r = self.table.find(atom)
        if r not in self._leaves:
            st = self.table.parts(r)
            self._leaves[r] = frozenset({r}) if st is None else frozenset().union(*(self.leaves(c) for c in st[1]))
        return self._leaves[r]

    def prod_factor(self, atom: int, leaf: int) -> bool:
        """``leaf`` is exactly one factor of a product structure (so each slot has one coordinate)."""
        r = self.table.find(atom)
        if r == leaf:
            return True
        st = self.table.parts(r)
        if st is None or st[0] != "prod":
            return False
        holding = [c for c in st[1] if leaf in self.leaves(c)]
        return len(holding) == 1 and self.prod_factor(holding[0], leaf)

    def __call__(self, atom: int):
        r = self.table.find(atom)
        if r not in self.cache:
            size = self.table.size(r)
            blocks = [(b.leaf, b.offset, b.outer, b.size, b.inner) for b in self.table.blocks(r, self.frozen)
                      if b.frozen is None]
            self.cache[r] = (int(size) if isinstance(size, int) or getattr(size, "is_Integer", False) else None,
                             blocks)
        return self.cache[r]


def _anchor(atoms: list[int], lay: _Layouts, child: int, parent: int, psize: int,
            param: bool) -> tuple[int, int, int] | None:
    """``(atom, child dim, parent dim)``: the atom of this tensor that carries the parent coordinate
    of its child slots, and the dims holding the child and the parent (condition 1); None if the
    tensor holds no child slot. Raises `_Bad` when a child slot has no single parent
    coordinate (or, for a parameter, not one `autoperm.spec.Axis` can name)."""
    child_dims = [d for d, a in enumerate(atoms) if child in lay.leaves(a)]
    if not child_dims:
        return None
    if len(child_dims) > 1:
        raise _Bad("the child sits in two dims of one tensor")
    d = child_dims[0]
    parent_dims = [e for e, a in enumerate(atoms) if parent in lay.leaves(a)]
    size, blocks = lay(atoms[d])
    if parent_dims == [d] and size is not None:
        try:
            pmap = slot_coordinates([(o, out, i) for leaf, o, out, _, i in blocks if leaf == parent], psize, size)
        except SpecError as e:
            raise _Bad(str(e)) from None
        for leaf, off, outer, csize, inner in blocks:
            if leaf != child:
                continue
            coord = pmap[block_slots(off, outer, csize, inner)].reshape(outer, -1)
            if (coord < 0).any() or (coord != coord[:, :1]).any():
                raise _Bad("a child chunk spans several parent slots or none")
            if param and not chunks_by_parent(pmap, off, outer, csize, inner, psize):
                raise _Bad("a parameter's child layout is not chunked by parent slot")
        if sum(outer * csize * inner for leaf, _, outer, csize, inner in blocks if leaf == child) == 0:
            raise _Bad("child slots in a dim without a layout")
        return atoms[d], d, d
    if len(parent_dims) == 1 and parent_dims != [d] and not param and lay.prod_factor(atoms[parent_dims[0]], parent):
        return atoms[parent_dims[0]], d, parent_dims[0]
    raise _Bad("child slots without a single parent coordinate")


def _mixes_parent_only(node: torch.fx.Node, values: dict, lay: _Layouts, child: int, parent: int) -> bool:
    """Condition 3: a softmax / layer norm whose mixed dims hold the parent but not the child."""
    name = packet_name(node.target)
    src = node.args[0] if node.args else None
    atoms = values.get(src) if isinstance(src, torch.fx.Node) else None
    if not isinstance(atoms, list) or not all(isinstance(a, int) for a in atoms):
        return False
    if name in _SOFTMAX:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        mixed = [atoms[int(dim) % len(atoms)]] if isinstance(dim, int) else list(atoms)
    elif rule_for(node.target) is not None and rule_for(node.target).fn.__name__ == "layer_norm":
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape", ())
        mixed = atoms[len(atoms) - len(shape):] if isinstance(shape, (list, tuple)) and shape else list(atoms)
    else:
        return False
    leaves = set().union(*(lay.leaves(a) for a in mixed)) if mixed else set()
    return parent in leaves and child not in leaves


# Products: argument name -> the dims (from the end) where the parent may sit apart from the child
# without being mixed: the batch dims, aligned position by position across the operands.
_BATCH_FROM_END = {"linear": {"input": 1}, "matmul": {"self": 2, "other": 2, "mat2": 2},
                   "addmm": {"mat1": 2, "mat2": 2, "batch1": 2, "batch2": 2, "mat": 2, "vec": 1},
                   "sdpa": {"query": 2, "key": 2, "value": 2}, "conv": {}, "convolution": {}, "batch_norm": {}}


def _misplaced(node: torch.fx.Node, rule: str, values: dict, anchors: dict) -> str | None:
    """Products pair slots by argument role, not by atom: an operand filling two roles (``sdpa(t, t,
    t)``, ``linear(m, m)``) has one atom for two dims the op does not align. So in a product every
    operand holding the child must hold the parent in the child's own dim (a flattened
    ``heads * head_dim``, contracted or carried as a whole) or in a batch dim (aligned across the
    operands and the output); never in a dim the product mixes (rows, columns, sequence)."""
    if rule not in _BATCH_FROM_END:
        return None
    batch = _BATCH_FROM_END[rule]
    args = dict(zip([a.name for a in node.target._schema.arguments], node.args)) if hasattr(node.target, "_schema") \
        else {}
    args.update(node.kwargs)
    for name, arg in args.items():
        if not isinstance(arg, torch.fx.Node):
            continue
        atoms = values.get(arg)
        if not (isinstance(atoms, list) and all(isinstance(a, int) for a in atoms)):
            continue
        got = anchors.get(id(atoms))
        if got is None:
            continue
        _, dc, dp = got
        if dp == dc:
            continue
        first_mixed = len(atoms) - batch[name] if name in batch else 0  # dims from here on are mixed
        # linear's weight has no batch dims, so a child contracted there cannot be paired by head
        if dp >= first_mixed or (rule == "linear" and dc >= first_mixed):
            return f"the parent sits in a dim that {packet_name(node.target)} mixes (argument {name!r})"
    return None


def _joined(cons: list[Constraint], anchors: list[int]) -> bool:
    """Condition 2: the anchors are one component of the op's own ties and compositions."""
    if len(set(anchors)) <= 1:
        return True
    up: dict[int, int] = {}

    def find(x: int) -> int:
        while up.get(x, x) != x:
            x = up[x]
        return x

    for c in cons:
        if isinstance(c, Tie):
            up[find(c.a)] = find(c.b)
        elif isinstance(c, Compose):
            for p in c.parts:
                up[find(p)] = find(c.a)
    return len({find(a) for a in anchors}) == 1


def _operands(node: torch.fx.Node, values: dict) -> list[list[int]]:
    """The tensors an op reads and writes; for getitem only the element it picks."""
    if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        src, idx = values.get(node.args[0]), node.args[1]
        picked = src[idx] if isinstance(src, list) and isinstance(idx, int) and idx < len(src) else None
        return [*_tensors(picked), *_tensors(values.get(node))]
    return [t for n in [*node.all_input_nodes, node] for t in _tensors(values.get(n))]


def _check(child: int, parent: int, psize: int, graph, values: dict, node_cons: dict, params: set,
           lay: _Layouts) -> None:
    anchors: dict[int, int | None] = {}  # id of a tensor's atom list -> its anchor
    for node in graph.nodes:
        if node.op not in ("placeholder", "call_function"):
            continue
        for atoms in _tensors(values.get(node)):
            try:
                anchors[id(atoms)] = _anchor(atoms, lay, child, parent, psize, node.name in params)
            except _Bad as e:
                raise _Bad(f"{node.name}: {e}") from None
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        held = [anchors.get(id(t)) for t in _operands(node, values)]
        held = [a[0] for a in held if a is not None]
        if not held:
            continue
        entry = rule_for(node.target)
        if entry is None or entry.fn.__name__ not in LOCAL_RULES:
            raise _Bad(f"{node.name} ({packet_name(node.target)}) is not a head-local op")
        if _mixes_parent_only(node, values, lay, child, parent):
            raise _Bad(f"{node.name} mixes along the parent dim alone")
        role = _misplaced(node, entry.fn.__name__, values, anchors)
        if role:
            raise _Bad(f"{node.name}: {role}")
        if not _joined(node_cons.get(node, []), held):
            raise _Bad(f"{node.name} pairs child slots of different parent slots")


def find_children(graph, table: AtomTable, values: dict, node_cons: dict, frozen: dict[int, str],
                  params: set[str], groups: dict[int, int]) -> dict[int, int]:
    """``{child leaf: parent leaf}`` for every permutable leaf that provably takes one permutation
    per slot of another (see the module docstring). ``groups`` maps each group's leaf to its size;
    ``params`` names the placeholders of state_dict tensors."""
    lay = _Layouts(table, frozen)
    pairs: set[tuple[int, int]] = set()
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in params:
            for atoms in _tensors(values.get(node)):
                for a in atoms:
                    leaves = {b[0] for b in lay(a)[1]} & set(groups)
                    pairs |= {(c, p) for c in leaves for p in leaves if c != p}
    found: dict[int, int] = {}
    for child, parent in sorted(pairs):
        if child in found:
            continue
        try:
            _check(child, parent, groups[parent], graph, values, node_cons, params, lay)
        except _Bad as e:
            log.debug("child %d of parent %d: not hierarchical (%s)", child, parent, e)
            continue
        found[child] = parent
    # one level only: a parent is never itself a child
    return {c: p for c, p in found.items() if p not in found}
