"""THE PASS: a `TracedGraph` through the rules into a union-find, then a `PermutationSpec`.

For every node in topological order the pass makes one atom per dim of each tensor value
(`autoperm.ir`), asks the rule registered for the node's op (`autoperm.rules`) for constraints
and applies them. Then:

* graph inputs and outputs are frozen (the model's interface never changes);
* a node whose op has no rule freezes every atom it touches, with the reason
  (``"no rule for aten.roll.default at layer3.0 (model.py:88)"``);
* placeholders without a state_dict key (non-persistent buffers, lifted constants) and
  parameters the forward never uses are frozen with that reason, except the dims along which
  a non-persistent buffer is constant (no permutation changes it there: `autoperm._invariance`;
  lifted tensor attributes stay frozen whole: they can be caches derived from parameters);
* tied weights (one storage, several names) are joined dim by dim.

Each remaining leaf class that touches a state_dict tensor is a `PermGroup`; each place it does
is an `Axis` with its layout. The spec is validated before it is returned.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from ._invariance import constant_dims
from .errors import AnalysisError, UnsupportedOpError
from .batch_twin import keep_shared_groups
from .frontend import TracedGraph, node_origin
from .hierarchy import find_children
from .ir import AtomTable, SymbolicSizeError, _same as same_size
from .rules.base import RuleContext, op_name, rule_for, sizes_of
from .rules.base import packet_name as _packet_name
from .spec import Axis, Frozen, PermGroup, PermutationSpec

__all__ = ["analyze", "analyze_with_sites", "Site", "IGNORED_OPS", "PRODUCERS"]

# Ops whose outputs are a layer's pre-activation features (sites for activation statistics).
PRODUCERS = {"linear", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "addmm", "mm", "bmm", "matmul", "baddbmm", "einsum", "embedding",
             "scaled_dot_product_attention"}


@dataclass(frozen=True)
class Site:
    """Where a group's units appear in an intermediate value: node output, dim, layout."""

    node: str
    dim: int
    offset: int
    outer: int
    inner: int
    producer: bool  # the output of a conv / linear / product: pre-activation features

log = logging.getLogger(__name__)

# Ops that produce no tensor and change no value: shape queries and runtime assertions.
IGNORED_OPS = {
    "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata",
    "_assert_scalar", "_assert_async", "sym_constrain_range", "sym_constrain_range_for_size",
    "_functional_assert_async", "_functional_sym_constrain_range",
}


def _fresh(table: AtomTable, val: Any) -> Any:
    """Atoms for a node's meta value: a list per tensor, a list of those for tuples."""
    if isinstance(val, torch.Tensor):
        return [table.new(s) for s in sizes_of(val)]
    if isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val):
        return [_fresh(table, v) for v in val]
    return None


def _flat(atoms: Any) -> list[int]:
    if atoms is None:
        return []
    if isinstance(atoms, list) and all(isinstance(a, int) for a in atoms):
        return list(atoms)
    return [a for x in atoms for a in _flat(x)]


def _node_tensors(node: torch.fx.Node, values: dict) -> list[int]:
    out: list[int] = []
    for a in node.all_input_nodes:
        out += _flat(values.get(a))
    return out


def _tie_buffer_write(tg: TracedGraph, table: AtomTable, values: dict, node: torch.fx.Node) -> bool:
    """A graph output that is only a buffer's new value: the next call reads it as that buffer, so
    it must move as the buffer moves (tied dim by dim), not stay in place. False if it is not one."""
    source = tg.writes.get(node.name)
    if source is None:
        return False
    buffer = next((n for n in tg.graph.nodes if n.op == "placeholder" and n.name == source), None)
    new, old = values.get(node), values.get(buffer) if buffer is not None else None
    if not (isinstance(new, list) and isinstance(old, list) and len(new) == len(old)
            and all(isinstance(a, int) for a in new + old) and all(same_size(table.size(a), table.size(b))
                                                                   for a, b in zip(new, old))):
        return False
    for a, b in zip(new, old):
        table.tie(a, b)
    return True


def _run_rules(tg: TracedGraph, table: AtomTable, values: dict, unsupported: Counter,
               record: dict | None = None) -> None:
    for node in tg.graph.nodes:
        if node.op == "placeholder":
            values[node] = _fresh(table, node.meta.get("val"))
            continue
        if node.op == "output":
            for n in node.all_input_nodes:
                if not _tie_buffer_write(tg, table, values, n):
                    for a in _flat(values.get(n)):
                        table.freeze(a, "model output")
            continue
        values[node] = _fresh(table, node.meta.get("val"))
        origin = node_origin(node)
        entry = rule_for(node.target) if node.op == "call_function" else None
        if entry is None:
            touched = _node_tensors(node, values) + _flat(values[node])
            if not touched or _packet_name(node.target) in IGNORED_OPS:
                continue
            name = op_name(node.target)
            unsupported[name] += 1
            for a in touched:
                table.freeze(a, f"no rule for {name} at {origin}")
            continue
        ctx = RuleContext(node, table, values, origin)
        try:
            constraints = list(entry.fn(ctx))
            if record is not None:
                record[node] = constraints
            for c in constraints:
                table.apply(c)
        except SymbolicSizeError as e:  # sizes of batch arithmetic the rule cannot prove equal: freeze
            why = f"{op_name(node.target)} mixes sizes that depend on the batch ({e}) at {origin}"
            log.info("%s: its dims were frozen", why)
            for a in _node_tensors(node, values) + _flat(values[node]):
                table.freeze(a, why)
        except AnalysisError as e:
            raise AnalysisError(f"rule {entry.fn.__name__} for {op_name(node.target)} at {origin}: {e}") from e
        except Exception as e:
            raise AnalysisError(f"rule {entry.fn.__name__} failed on {op_name(node.target)} at {origin}: "
                                f"{type(e).__name__}: {e}") from e


def _freeze_interface(tg: TracedGraph, table: AtomTable, values: dict) -> None:
    by_name = {n.name: n for n in tg.graph.nodes if n.op == "placeholder"}
    for name in tg.user_inputs:
        for a in _flat(values.get(by_name[name])):
            table.freeze(a, "model input")
    for name, key in tg.state_keys.items():
        why = tg.unrecorded.get(key)
        if why is not None:
            for a in _flat(values.get(by_name[name])):
                table.freeze(a, why)
    for name, why in tg.keyless.items():
        atoms = values.get(by_name[name])
        value = tg.constants.get(name) if name in tg.buffers else None
        free = set(constant_dims(value)) if isinstance(value, torch.Tensor) and isinstance(atoms, list) \
            and len(atoms) == value.dim() else set()
        for d, a in enumerate(atoms if isinstance(atoms, list) else _flat(atoms)):
            if d not in free:  # a dim the tensor is constant along is left unchanged by any permutation
                table.freeze(a, why)
    canon_of = {alias: c for c, aliases in tg.tied.items() for alias in aliases} | {c: c for c in tg.tied}
    written = set(tg.writes.values())  # a buffer only written is still state: it moves
    used_storage = {canon_of.get(key, key) for name, key in tg.state_keys.items()
                    if by_name[name].users or name in written}
    for name, key in tg.state_keys.items():
        if canon_of.get(key, key) not in used_storage:
            for a in _flat(values.get(by_name[name])):
                table.freeze(a, "unused in the traced forward")
    # tied weights exported as several placeholders: one tensor, so one set of atoms
    first: dict[str, list[int]] = {}
    for name, key in tg.state_keys.items():
        c = canon_of.get(key)
        if c is None:
            continue
        atoms = values.get(by_name[name])
        if c in first:
            for a, b in zip(first[c], atoms, strict=True):
                table.tie(a, b)
        else:
            first[c] = atoms


def _emit(tg: TracedGraph, table: AtomTable, values: dict) -> tuple[PermutationSpec, dict[int, str]]:
    frozen_map = table.frozen_closure()
    by_name = {n.name: n for n in tg.graph.nodes if n.op == "placeholder"}
    aliases = {a for names in tg.tied.values() for a in names}
    axes: dict[int, list[Axis]] = {}
    sizes: dict[int, int] = {}
    frozen: list[Frozen] = []
    seen: set[str] = set()
    for name, key in tg.state_keys.items():
        if key in seen or key in aliases:
            continue
        seen.add(key)
        if key in tg.unrecorded:  # every dim frozen; the entry's shape may not be the graph's (_relaid_keys)
            frozen += [Frozen(key, d, s, tg.unrecorded[key]) for d, s in enumerate(tg.shapes.get(key, ())) if s >= 2]
            continue
        for dim, atom in enumerate(values.get(by_name[name]) or []):
            for blk in table.blocks(atom, frozen_map):
                if blk.size < 2:
                    continue
                if blk.frozen is not None:
                    frozen.append(Frozen(key, dim, blk.size, blk.frozen, blk.offset, blk.outer, blk.inner))
                else:
                    axes.setdefault(blk.leaf, []).append(Axis(key, dim, blk.offset, blk.outer, blk.inner))
                    sizes[blk.leaf] = blk.size
    for key, shape in tg.shapes.items():
        if key not in seen and key not in aliases:
            frozen += [Frozen(key, d, s, "unused in the traced forward") for d, s in enumerate(shape) if s >= 2]
    groups, used, names = [], Counter(), {}
    for leaf, ax in axes.items():
        base = ax[0].tensor.rsplit(".", 1)[0] if "." in ax[0].tensor else ax[0].tensor
        used[base] += 1
        names[leaf] = base if used[base] == 1 else f"{base}#{used[base] - 1}"
        groups.append(PermGroup(names[leaf], sizes[leaf], ax))
    return PermutationSpec(groups, frozen, dict(tg.shapes), {k: list(v) for k, v in tg.tied.items()}), names


def _sites(tg: TracedGraph, table: AtomTable, values: dict, names: dict[int, str]) -> dict[str, list[Site]]:
    frozen_map = table.frozen_closure()
    out: dict[str, list[Site]] = {n: [] for n in names.values()}
    for node in tg.graph.nodes:
        atoms = values.get(node)
        if node.op != "call_function" or not atoms or not all(isinstance(a, int) for a in atoms):
            continue
        producer = _packet_name(node.target) in PRODUCERS
        for dim, atom in enumerate(atoms):
            for blk in table.blocks(atom, frozen_map):
                if blk.size >= 2 and blk.frozen is None and blk.leaf in names:
                    out[names[blk.leaf]].append(Site(node.name, dim, blk.offset, blk.outer, blk.inner, producer))
    return out


def analyze(tg: TracedGraph, *, strict: bool = False, hierarchical: bool = False) -> PermutationSpec:
    """Compile the permutation spec of a traced graph.

    With ``strict=True`` an op without a rule raises `UnsupportedOpError` instead of freezing.
    With ``hierarchical=True`` a group that provably takes one permutation per slot of another
    (each attention head's head_dim) gets that group as its ``parent`` (`autoperm.hierarchy`).

    Example::

        tg = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4))
        spec = analyze(tg)
        [(g.name, g.size) for g in spec.groups]    # [('0', 8)]
    """
    spec, _ = _compile(tg, strict, hierarchical)
    return spec


def analyze_with_sites(tg: TracedGraph, *, strict: bool = False,
                       hierarchical: bool = False) -> tuple[PermutationSpec, dict[str, list[Site]]]:
    """`analyze`, plus where each group's units appear in intermediate values (for activation
    statistics: `autoperm._stats`)."""
    return _compile(tg, strict, hierarchical)


def _compile(tg: TracedGraph, strict: bool, hierarchical: bool = False) -> tuple[PermutationSpec, dict[str, list[Site]]]:
    table = AtomTable()
    values: dict[torch.fx.Node, Any] = {}
    unsupported: Counter = Counter()
    record: dict = {}
    _run_rules(tg, table, values, unsupported, record if hierarchical else None)
    if strict and unsupported:
        raise UnsupportedOpError(
            f"no permutation rule for {sorted(unsupported)}; register one with "
            "@autoperm.register_rule(op), or pass strict=False to freeze the dims they touch")
    _freeze_interface(tg, table, values)
    spec, names = _emit(tg, table, values)
    if hierarchical:
        sizes = {leaf: spec.group(name).size for leaf, name in names.items()}
        kids = find_children(tg.graph, table, values, record, table.frozen_closure(), set(tg.state_keys), sizes)
        for child, parent in kids.items():
            spec.group(names[child]).parent = names[parent]
        spec.meta["hierarchical"] = True
    spec.meta.update({"frontend": tg.frontend, "dynamic_batch": tg.dynamic_batch,
                      "torch": torch.__version__, "unsupported_ops": dict(unsupported)})
    for op, n in unsupported.items():
        log.info("no rule for %s (%d nodes): its dims were frozen", op, n)
    sites = _sites(tg, table, values, names)
    for twin_graph in tg.twins:  # exported at a fixed batch: keep what holds at the other sizes too
        twin, _ = _compile(twin_graph, strict, hierarchical)
        spec, sites = keep_shared_groups(spec, sites, twin, (
            f"the graph fixes the batch at {tg.static_batch} and this group differs at batch {twin_graph.static_batch} "
            "(a reshape mixing the batch with features?), so it does not hold at every batch size"))
    if tg.static_batch is not None:
        spec.meta["static_batch"] = tg.static_batch
        spec.meta["batch_checked"] = [tg.static_batch] + [t.static_batch for t in tg.twins]
    return spec.validate(), sites

