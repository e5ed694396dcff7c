"""Views of a spec: a printable table, a networkx graph and a DOT graph (pydot).

networkx and pydot are imported lazily, so the rest of autoperm works without them.

The table follows Tables 4 and 5 of "Knowledge Transfer in the Wild: Distill and Merge!": one row
per state_dict tensor with its shape and the group on each dim. Example::

    tensor        shape     dim 0   dim 1
    0.weight      [8, 4]    0       .
    0.bias        [8]       0
    2.weight      [3, 8]    .       0
    . frozen: model input (1), model output (2)
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import PermutationSpec

__all__ = ["format_table", "to_networkx", "to_dot"]

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39"]


def _cells(spec: "PermutationSpec") -> dict[tuple[str, int], list[str]]:
    cells: dict[tuple[str, int], list[str]] = defaultdict(list)
    for g in spec.groups:
        for a in g.axes:
            lay = a.describe(g.size)
            cells[(a.tensor, a.dim)].append(f"{g.name}{' ' + lay if lay else ''}")
    for f in spec.frozen:
        cells[(f.tensor, f.dim)].append(".")
    return cells


def format_table(spec: "PermutationSpec") -> str:
    """One row per tensor: name, shape, and what acts on each dim (group name, or ``.`` frozen)."""
    cells = _cells(spec)
    aliases = {a: c for c, names in spec.tied.items() for a in names}
    ndim = max((len(s) for s in spec.shapes.values()), default=0)
    rows = [["tensor", "shape"] + [f"dim {d}" for d in range(ndim)]]
    for name, shape in spec.shapes.items():
        row = [name, str(list(shape))]
        for d in range(ndim):
            if d >= len(shape):
                row.append("")
            elif name in aliases:
                row.append(f"= {aliases[name]}")
            else:
                vals = [v for v in cells.get((name, d), []) if v != "."]
                row.append(", ".join(vals) if vals else ("." if shape[d] > 1 else ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    reasons: dict[str, int] = {}
    for why, n in spec.frozen_reasons().items():
        short_why = why.split(" at ")[0]
        reasons[short_why] = reasons.get(short_why, 0) + n
    if reasons:
        short = sorted(reasons.items(), key=lambda kv: -kv[1])
        lines.append(". frozen: " + "; ".join(f"{r} ({n})" for r, n in short[:12])
                     + (f"; ... {len(short) - 12} more reasons" if len(short) > 12 else ""))
    lines.append(f"{len(spec.groups)} groups, {sum(len(g.axes) for g in spec.groups)} axes, "
                 f"{len(spec.frozen)} frozen entries")
    return "\n".join(lines)


def to_networkx(spec: "PermutationSpec"):
    """A bipartite ``networkx.MultiGraph``: group nodes (``kind="group"``, ``size``), tensor nodes
    (``kind="tensor"``, ``shape``, ``frozen`` reasons), one edge per axis (``dim``, ``layout``)."""
    try:
        import networkx as nx
    except ImportError as e:  # pragma: no cover - networkx is a runtime dependency
        raise ImportError("to_networkx() needs networkx: pip install networkx") from e
    graph = nx.MultiGraph()
    for name, shape in spec.shapes.items():
        graph.add_node(f"tensor:{name}", kind="tensor", label=name, shape=tuple(shape),
                       frozen=[f"dim {f.dim}: {f.reason}" for f in spec.frozen_of(name)])
    for g in spec.groups:
        graph.add_node(f"group:{g.name}", kind="group", label=g.name, size=g.size)
        for a in g.axes:
            graph.add_edge(f"group:{g.name}", f"tensor:{a.tensor}", dim=a.dim, layout=a.describe(g.size))
    return graph


def _q(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def to_dot(spec: "PermutationSpec"):
    """A ``pydot.Dot`` graph: one colour per group, tensors as boxes listing their frozen dims."""
    try:
        import pydot
    except ImportError as e:
        raise ImportError("to_dot() needs pydot: pip install pydot") from e
    dot = pydot.Dot("spec", graph_type="graph", rankdir="LR", fontname="Helvetica")
    for name, shape in spec.shapes.items():
        frozen = sorted({f"dim {f.dim}: {f.reason}" for f in spec.frozen_of(name)})
        label = f"{name}\\n{list(shape)}" + "".join(f"\\nfrozen {r}" for r in frozen[:3])
        dot.add_node(pydot.Node(_q(f"t:{name}"), label=_q(label), shape="box", fontsize="10"))
    for i, g in enumerate(spec.groups):
        colour = _PALETTE[i % len(_PALETTE)]
        dot.add_node(pydot.Node(_q(f"g:{g.name}"), label=_q(f"{g.name}\\n({g.size})"), shape="ellipse",
                                style="filled", fillcolor=colour, fontcolor="white"))
        for a in g.axes:
            lay = a.describe(g.size)
            dot.add_edge(pydot.Edge(_q(f"g:{g.name}"), _q(f"t:{a.tensor}"), color=colour,
                                    label=_q(f"dim {a.dim}{' ' + lay if lay else ''}"), fontsize="8"))
    return dot
