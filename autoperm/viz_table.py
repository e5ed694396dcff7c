"""The printable per-tensor table of a spec (`PermutationSpec.table`, `autoperm.viz.format_table`).

One row per state_dict tensor: name, shape and what acts on each dim: the group (with its layout
when it covers only part of the dim), ``.`` for a frozen dim, ``-`` for a dim of size 1; then a
legend of the frozen reasons and of the abbreviations used.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import Axis, PermutationSpec

__all__ = ["format_table", "layout_length"]


def _cells(spec: "PermutationSpec") -> dict[tuple[str, int], list[str]]:
    cells: dict[tuple[str, int], list[str]] = defaultdict(list)
    for g in spec.groups:
        for a in g.axes:
            lay = a.describe(g.size, layout_length(spec, a))
            cells[(a.tensor, a.dim)].append(f"{g.name}{' ' + lay if lay else ''}")
    for f in spec.frozen:
        cells[(f.tensor, f.dim)].append(".")
    return cells


def layout_length(spec: "PermutationSpec", a: "Axis") -> int | None:
    """The length of the dim ``a`` acts on (None when the spec has no shape for it)."""
    shape = spec.shapes.get(a.tensor)
    return shape[a.dim] if shape is not None and 0 <= a.dim < len(shape) else None


_CELL_GROUPS = 4  # groups listed in one table cell before the middle ones are elided


def format_table(spec: "PermutationSpec") -> str:
    """One row per tensor: name, shape, and what acts on each dim (group name, or ``.`` frozen)."""
    cells = _cells(spec)
    aliases = {a: c for c, names in spec.tied.items() for a in names}
    ndim = max((len(s) for s in spec.shapes.values()), default=0)
    rows = [["tensor", "shape"] + [f"dim {d}" for d in range(ndim)]]
    collapsed = many = single = False
    for name, shape in spec.shapes.items():
        row = [name, str(list(shape))]
        for d in range(ndim):
            if d >= len(shape):
                row.append("")
            elif name in aliases:
                row.append(f"= {aliases[name]}")
            else:
                vals = [v for v in cells.get((name, d), []) if v != "."]
                if len(vals) > 2:  # fused or per-head layouts: one entry per group, with its slice count
                    counts = Counter(v.split(" ", 1)[0] for v in vals)
                    vals = [f"{g} x{n}" if n > 1 else g for g, n in counts.items()]
                    collapsed = True
                if len(vals) > _CELL_GROUPS:  # a concatenation of many groups (DenseNet): first and last
                    vals = vals[:_CELL_GROUPS - 2] + [f"... +{len(vals) - _CELL_GROUPS + 1} groups ...", vals[-1]]
                    many = True
                single = single or (not vals and shape[d] <= 1)
                row.append(", ".join(vals) if vals else ("." if shape[d] > 1 else "-"))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    reasons = spec.frozen_reasons(locations=False)
    if reasons:
        short = sorted(reasons.items(), key=lambda kv: -kv[1])
        lines.append(". frozen: " + "; ".join(f"{r} ({n})" for r, n in short[:12])
                     + (f"; ... {len(short) - 12} more reasons" if len(short) > 12 else ""))
    kids: dict[str, list[str]] = {}
    for g in spec.groups:
        if g.parent:
            kids.setdefault(g.parent, []).append(g.name)
    for parent, names in list(kids.items())[:12]:
        lines.append(f"per slot of {parent}: {', '.join(names)} (one permutation per {parent} unit)")
    if len(kids) > 12:
        lines.append(f"... {len(kids) - 12} more parents with per-slot groups")
    if single:
        lines.append("- size-1 dim: nothing to permute (not a frozen entry)")
    if collapsed:
        lines.append("G xN: group G acts on N slices of that dim (their layouts: spec.group(G).axes)")
    if many:
        lines.append("... +N groups ...: the dim concatenates more groups than shown (all: spec.axes_of(tensor))")
    lines.append(f"{len(spec.groups)} groups, {sum(len(g.axes) for g in spec.groups)} axes, "
                 f"{len(spec.frozen)} frozen entries")
    return "\n".join(lines)
