"""The rule registry and the context a rule reads its node through.

A *rule* is a function ``rule(ctx: RuleContext) -> list[Constraint]`` for one op family. It
reads the atoms of the node's inputs and output through ``ctx`` and returns `Tie`, `Freeze` and
`Compose` constraints; only the analysis pass applies them. The registry `RULES` (keyed by ATen
overload packet, overload, or Python callable such as ``operator.getitem``) is the single source
of truth: the analysis, `docs/rules.md` and the tests all read it.

Worked example (a user's own elementwise op)::

    @autoperm.register_rule(torch.ops.mylib.my_act.default)
    def my_act(ctx):
        return ctx.tie_all(ctx.atoms(ctx.arg("x")), ctx.out)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from ..ir import AtomTable, Compose, Constraint, Freeze, Tie

__all__ = ["Rule", "RuleEntry", "RULES", "RuleContext", "register_rule", "rule_for", "aten_ops", "packet_name"]

Rule = Callable[["RuleContext"], Iterable[Constraint]]


@dataclass(frozen=True)
class RuleEntry:
    fn: Rule
    family: str

    @property
    def doc(self) -> str:
        return ((self.fn.__doc__ or "").strip().splitlines() or [""])[0]


RULES: dict[Any, RuleEntry] = {}


def aten_ops(*names: str) -> list[Any]:
    """``torch.ops.aten.<name>`` packets for the names this torch build has."""
    out = []
    for n in names:
        try:
            out.append(getattr(torch.ops.aten, n))
        except (AttributeError, RuntimeError):
            continue
    return out


def register_rule(*ops: Any, family: str | None = None) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the rule for ``ops`` (ATen packets / overloads or Python callables).

    A later registration for the same op replaces the earlier one, so users can override a
    built-in rule. Example: ``register_rule(torch.ops.mylib.op.default)(my_rule)``.
    """
    if not ops:
        raise TypeError("register_rule needs at least one op, e.g. register_rule(torch.ops.aten.relu)")

    def deco(fn: Rule) -> Rule:
        fam = family or fn.__module__.rsplit(".", 1)[-1]
        for op in ops:
            RULES[op] = RuleEntry(fn, fam)
        return fn

    return deco


def rule_for(target: Any) -> RuleEntry | None:
    """The rule registered for a node target (the overload first, then its packet)."""
    try:
        entry = RULES.get(target)
    except TypeError:
        return None
    if entry is None and hasattr(target, "overloadpacket"):
        entry = RULES.get(target.overloadpacket)
    return entry


def packet_name(node_or_target: Any) -> str:
    """The ATen overload packet's name of a node (or node target), e.g. ``"linear"``; ``""`` otherwise."""
    target = getattr(node_or_target, "target", node_or_target) if isinstance(node_or_target, torch.fx.Node) \
        else node_or_target
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", "") if packet is not None else ""


def op_name(target: Any) -> str:
    """``aten.relu.default``-style name of a node target."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def sizes_of(val: Any) -> tuple[Any, ...]:
    """A fake tensor's shape, with symbolic sizes as sympy expressions."""
    out = []
    for s in val.shape:
        if isinstance(s, torch.SymInt):
            expr = s.node.expr
            out.append(int(expr) if expr.is_Integer else expr)
        else:
            out.append(int(s))
    return tuple(out)


def _bind(node: torch.fx.Node) -> dict[str, Any]:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
    bound: dict[str, Any] = {}
    args = list(node.args)
    for i, a in enumerate(target._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            bound[a.name] = args[i]
        elif a.name in node.kwargs:
            bound[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
    return bound


class RuleContext:
    """What a rule sees of one node: bound arguments, atoms per tensor value, constraint makers."""

    def __init__(self, node: torch.fx.Node, table: AtomTable, values: dict[torch.fx.Node, Any],
                 origin: str) -> None:
        self.node = node
        self.table = table
        self._values = values
        self.origin = origin
        self.args = _bind(node)
        self.out = values.get(node)

    # -------------------------------------------------------------- reading
    def arg(self, name: str | int, default: Any = None) -> Any:
        """A bound argument by schema name (ATen ops) or position (Python callables)."""
        return self.args.get(str(name) if isinstance(name, int) else name, default)

    def atoms(self, value: Any) -> Any:
        """The atoms of a graph value (a list per tensor, nested for tuples); None otherwise."""
        if isinstance(value, torch.fx.Node):
            return self._values.get(value)
        return None

    def size(self, atom: int) -> Any:
        return self.table.size(atom)

    def sizes(self, atoms: Sequence[int]) -> list[Any]:
        return [self.table.size(a) for a in atoms]

    def fresh(self, size: Any) -> int:
        return self.table.new(size)

    def tensor_args(self) -> list[list[int]]:
        """Atoms of every tensor argument (flattening list arguments such as cat's)."""
        out = []
        for v in self.args.values():
            for item in (v if isinstance(v, (list, tuple)) else [v]):
                a = self.atoms(item)
                if isinstance(a, list) and all(isinstance(x, int) for x in a):
                    out.append(a)
        return out

    # -------------------------------------------------------------- constraints
    def freeze(self, atoms: Iterable[int], why: str) -> list[Constraint]:
        return [Freeze(a, f"{why} at {self.origin}") for a in atoms]

    @staticmethod
    def tie_all(xs: Sequence[int], ys: Sequence[int]) -> list[Constraint]:
        return [Tie(a, b) for a, b in zip(xs, ys, strict=True)]

    @staticmethod
    def compose(a: int, kind: str, parts: Sequence[int]) -> Constraint:
        return Compose(a, kind, tuple(parts))


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def is_getitem(target: Any) -> bool:
    return target is operator.getitem
