"""Rendering of the graphs built by `autoperm.viz` (`layer_graph`, `group_graph`) to DOT, SVG, PNG.

Graph attributes read here: the graph's ``caption`` and ``legend`` (a list of ``(group, size,
colour)``); per node ``label`` (lines joined by ``\\n``), ``fill``, ``border``, ``dashed`` and
optionally ``shape`` (``"ellipse"``); per edge ``colour`` and ``label``.

SVG / PNG are drawn by graphviz's ``dot`` binary when it is on the PATH, else by matplotlib with a
layered layout computed here (ranks by longest path in node order, barycentre ordering inside a
rank, long graphs wrapped into several columns). Every file is written atomically: to a temporary
file in the same folder, then renamed.

Example::

    from autoperm.viz import group_graph
    from autoperm.viz_render import render_graph
    render_graph(group_graph(spec), "groups.png")
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["graph_to_dot", "render_graph", "write_atomic", "pyplot", "INSTALL_HINT"]

log = logging.getLogger(__name__)
INSTALL_HINT = ("install graphviz (the `dot` binary: apt-get install graphviz / brew install graphviz) "
                "or matplotlib (pip install \"autoperm[viz]\")")
_RANKS_PER_COLUMN = 30
_MAX_ROW_W = 16.0  # inches


def write_atomic(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``;
    nothing half-written is ever left at ``path``. Example::

        write_atomic("spec.dot", lambda tmp: Path(tmp).write_text(text))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', "'").replace("\n", "\\n") + '"'


def graph_to_dot(graph) -> str:
    """The DOT text of a graph from `autoperm.viz`: boxes tinted by group, coloured edges, the
    caption on top."""
    lines = ["digraph spec {", f"  graph [rankdir=TB, fontname=Helvetica, fontsize=12, labelloc=t, "
             f"label={_q(graph.graph.get('caption', ''))}];",
             "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];",
             "  edge [fontname=Helvetica, fontsize=8, arrowsize=0.6];"]
    for node, d in graph.nodes(data=True):
        style = "rounded,filled,dashed" if d.get("dashed") else "rounded,filled"
        shape = f", shape={d['shape']}" if d.get("shape") else ""
        lines.append(f"  {_q(node)} [label={_q(d.get('label', node))}, fillcolor={_q(d.get('fill', '#ffffff'))}, "
                     f"color={_q(d.get('border', '#777777'))}, style={_q(style)}{shape}];")
    for u, v, d in graph.edges(data=True):
        both = ", dir=both" if d.get("both") else ""
        lines.append(f"  {_q(u)} -> {_q(v)} [color={_q(d.get('colour', '#999999'))}{both}, "
                     f"fontcolor={_q(d.get('colour', '#999999'))}, label={_q(d.get('label', ''))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or ImportError with what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install \"autoperm[viz]\"") from e
    return plt


def render_graph(graph, path: str | Path) -> Path:
    """Write ``graph`` to ``path`` as ``.dot``, ``.svg`` or ``.png`` (see the module docstring).
    Without graphviz and matplotlib, writes the DOT file beside ``path`` and raises ImportError."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    text = graph_to_dot(graph)
    if fmt in ("dot", "gv"):
        return write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    if fmt not in ("svg", "png"):
        raise ValueError(f"cannot render to {path.name!r}: use a .dot, .svg or .png file name (or .json for the spec)")
    dot = shutil.which("dot")
    if dot is not None:
        def run_dot(tmp: str) -> None:
            subprocess.run([dot, f"-T{fmt}", "-o", tmp], input=text, text=True, check=True, capture_output=True)
        log.info("rendering %s with graphviz (%s)", path, dot)
        return write_atomic(path, run_dot)
    try:
        plt = pyplot()
    except ImportError:
        fallback = write_atomic(path.with_suffix(".dot"), lambda tmp: Path(tmp).write_text(text))
        raise ImportError(f"cannot render {path.name}: {INSTALL_HINT}; wrote the graph as {fallback} instead "
                          "(render it later with: dot -T" + fmt + f" {fallback} -o {path})") from None
    log.info("graphviz `dot` not found; drawing %s with matplotlib", path)
    return _draw(plt, graph, path, fmt)


# ----------------------------------------------------------------- matplotlib fallback
_CHAR_W, _LINE_H, _PAD, _GAP_X, _GAP_Y = 0.058, 0.15, 0.12, 0.35, 0.42  # inches, at fontsize 7


def _layout(graph) -> tuple[dict[Any, tuple[float, float]], dict[Any, tuple[float, float]], float, float]:
    """Node centres and box sizes in inches (y down), and the drawing's width and height."""
    order = list(graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    rank: dict[Any, int] = {}
    for n in order:  # longest path, along edges that go forward in node order
        preds = [rank[p] + 1 for p in graph.predecessors(n) if index[p] < index[n]]
        rank[n] = max(preds, default=0)
    size = {}
    for n, d in graph.nodes(data=True):
        lines = str(d.get("label", n)).split("\n")
        size[n] = (max(len(s) for s in lines) * _CHAR_W + 2 * _PAD, len(lines) * _LINE_H + 2 * _PAD)
    ranks: dict[int, list[Any]] = {}
    for n in order:
        ranks.setdefault(rank[n], []).append(n)
    rows: list[list[Any]] = []  # visual rows: a rank wider than _MAX_ROW_W is wrapped
    xpos: dict[Any, float] = {}
    for r in range(max(ranks) + 1):
        row = ranks.get(r, [])
        bary = {n: sum(xpos.get(p, 0.0) for p in graph.predecessors(n) if p in xpos)
                / max(1, sum(1 for p in graph.predecessors(n) if p in xpos)) for n in row}
        row.sort(key=lambda n: (bary[n], index[n]) if len(row) * 3 < _MAX_ROW_W else index[n])
        chunks, width = [[]], 0.0
        for n in row:
            if chunks[-1] and width + size[n][0] > _MAX_ROW_W:
                chunks.append([])
                width = 0.0
            chunks[-1].append(n)
            width += size[n][0] + _GAP_X
        for chunk in chunks:  # centre each visual row on 0
            x = -(sum(size[n][0] for n in chunk) + _GAP_X * (len(chunk) - 1)) / 2
            for n in chunk:
                xpos[n] = x + size[n][0] / 2
                x += size[n][0] + _GAP_X
            rows.append(chunk)
    n_rows = len(rows)
    cols = max(1, -(-n_rows // _RANKS_PER_COLUMN)) if n_rows > _RANKS_PER_COLUMN * 1.2 else 1
    per_col = -(-n_rows // cols)
    col_w = [0.0] * cols
    row_h = [max((size[n][1] for n in row), default=0.0) for row in rows]
    for r, row in enumerate(rows):
        for n in row:
            col_w[r // per_col] = max(col_w[r // per_col], 2 * abs(xpos[n]) + size[n][0])
    pos, height = {}, 0.0
    for c in range(cols):
        left = sum(col_w[:c]) + _GAP_X * 3 * c + col_w[c] / 2
        y = 0.0
        for r in range(c * per_col, min(n_rows, (c + 1) * per_col)):
            for n in rows[r]:
                pos[n] = (left + xpos[n], y + row_h[r] / 2)
            y += row_h[r] + _GAP_Y
        height = max(height, y)
    return pos, size, sum(col_w) + _GAP_X * 3 * (cols - 1), height


def _draw(plt, graph, path: Path, fmt: str) -> Path:
    from matplotlib.patches import Patch

    pos, size, width, height = _layout(graph)
    legend = graph.graph.get("legend") or []
    margin, caption_h = 0.3, 0.45
    fig_w = max(width + 2 * margin, 6.0)
    entry = max((len(f"{n} ({s})") for n, s, _ in legend), default=0) * 0.065 + 0.5
    legend_rows = -(-len(legend) // max(1, int(fig_w / entry))) if legend else 0
    legend_h = 0.17 * legend_rows + (0.3 if legend else 0)
    fig_h = height + caption_h + legend_h + 2 * margin
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(fig_h, 0)
    ax.axis("off")
    x0 = (fig_w - width) / 2
    top = margin + caption_h
    texts = {}
    for n, d in graph.nodes(data=True):
        x, y = pos[n]
        box = "round,pad=0.3" if d.get("shape") == "ellipse" else "round,pad=0.4"
        texts[n] = ax.text(x0 + x, top + y, d.get("label", str(n)), ha="center", va="center", fontsize=7,
                           family="DejaVu Sans", zorder=3,
                           bbox=dict(boxstyle=box, fc=d.get("fill", "#ffffff"), ec=d.get("border", "#777777"),
                                     ls="--" if d.get("dashed") else "-", lw=1.0))
    fig.canvas.draw()  # fixes the text boxes, so arrows can be clipped to them
    for u, v, d in graph.edges(data=True):
        (xu, yu), (xv, yv) = pos[u], pos[v]
        skip = yv - yu > size[u][1] / 2 + size[v][1] / 2 + _GAP_Y * 1.5
        if skip and abs(xu - xv) < 0.5:  # a skip edge in one column: a bracket beside the boxes
            between = [size[n][0] for n in pos if yu <= pos[n][1] <= yv and abs(pos[n][0] - xu) < size[n][0] / 2]
            arm = (max(between) / 2 + 0.25) / max(yv - yu, 1e-3)
            style = f"bar,fraction={-arm:.3f}"
        else:
            style = "arc3,rad=0.0"
        far = abs(xu - xv) > 4 and abs(yu - yv) > 4  # across wrapped columns: keep it light
        ax.annotate("", xy=(x0 + xv, top + yv), xytext=(x0 + xu, top + yu), zorder=4,
                    arrowprops=dict(arrowstyle="<|-|>" if d.get("both") else "-|>", ls=":" if far else "-", color=d.get("colour", "#999999"), lw=0.9, alpha=0.85,
                                    mutation_scale=9, shrinkA=1, shrinkB=1, connectionstyle=style,
                                    patchA=texts[u].get_bbox_patch(), patchB=texts[v].get_bbox_patch()))
    ax.text(fig_w / 2, margin + 0.1, graph.graph.get("caption", ""), ha="center", va="top", fontsize=9, wrap=True)
    if legend:
        handles = [Patch(fc=c, ec=c, label=f"{name} ({size_})") for name, size_, c in legend]
        entry = max(len(h.get_label()) for h in handles) * 0.065 + 0.5
        fig.legend(handles=handles, loc="lower center", ncol=max(1, min(len(handles), int(fig_w / entry))),
                   fontsize=7, frameon=False,
                   title="groups (size)", title_fontsize=7)
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))
    finally:
        plt.close(fig)
