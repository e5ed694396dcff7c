"""Views of a spec: a printable table, graphs (networkx, DOT) and rendered pictures (SVG / PNG).

networkx, pydot and matplotlib are imported lazily, so the rest of autoperm works without them.

* `format_table`: one row per state_dict tensor with its shape and the group on each dim (Tables
  4 and 5 of "Knowledge Transfer in the Wild: Distill and Merge!").
* `to_networkx` / `to_dot`: the bipartite view, group nodes joined to the tensors they act on.
* `layer_graph`: layers as nodes (a layer is the module owning some state_dict tensors), data
  flow as edges (recorded by `layer_flow` in one eager forward pass), one colour per group,
  frozen dims written on the layer with their reason.
* `group_graph`: the compact view, one node per group listing its member tensors, an edge between
  two groups that share a tensor (from the group on a weight's input dim to the one on its output).
* `render_spec`: write either graph as ``.dot``, ``.svg`` or ``.png`` (`autoperm.viz_render`).
* `plot_curve`: interpolation curves (`autoperm.Curve`) as a PNG / SVG with matplotlib.

Example::

    spec = autoperm.trace(model, x)
    print(spec.table())
    # tensor        shape     dim 0   dim 1
    # 0.weight      [8, 4]    0       .
    # 0.bias        [8]       0
    # 2.weight      [3, 8]    .       0
    # . frozen: model input (1), model output (2)
    render_spec(spec, "spec.png", model=model, example_inputs=x)
"""

from __future__ import annotations

import colorsys
import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .spec import state_of, strip_location
from .viz_flow import Flow, layer_flow, layer_of as _layer_of
from .viz_table import format_table, layout_length as _length

if TYPE_CHECKING:
    from torch import nn

    from .curve import Curve
    from .spec import PermutationSpec

__all__ = ["format_table", "to_networkx", "to_dot", "Flow", "layer_flow", "layer_graph", "group_graph",
           "group_colours", "render_spec", "plot_curve"]

log = logging.getLogger(__name__)

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39"]


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
            graph.add_edge(f"group:{g.name}", f"tensor:{a.tensor}", dim=a.dim,
                           layout=a.describe(g.size, _length(spec, a)))
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
            lay = a.describe(g.size, _length(spec, a))
            dot.add_edge(pydot.Edge(_q(f"g:{g.name}"), _q(f"t:{a.tensor}"), color=colour,
                                    label=_q(f"dim {a.dim}{' ' + lay if lay else ''}"), fontsize="8"))
    return dot


# ----------------------------------------------------------------- layer and group graphs
def group_colours(spec: "PermutationSpec") -> dict[str, str]:
    """One colour (``#rrggbb``) per group: the palette first, then evenly spread hues."""
    out, palette = {}, [c for c in _PALETTE if c != "#7f7f7f"]  # grey means "no group" in the pictures
    for i, g in enumerate(spec.groups):
        if i < len(palette):
            out[g.name] = palette[i]
        else:
            r, gr, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.8)
            out[g.name] = "#%02x%02x%02x" % (int(255 * r), int(255 * gr), int(255 * b))
    return out


def _short(reason: str, n: int = 44) -> str:
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def _tint(colour: str, amount: float = 0.72) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#%02x%02x%02x" % tuple(int(c + (255 - c) * amount) for c in (r, g, b))


def _caption(spec: "PermutationSpec") -> str:
    top = sorted(spec.frozen_reasons(locations=False).items(), key=lambda kv: -kv[1])[:4]
    return (f"{len(spec.groups)} groups, {len(spec.frozen)} frozen entries"
            + ("; frozen: " + "; ".join(f"{_short(r, 36)} ({n})" for r, n in top) if top else ""))


def layer_graph(spec: "PermutationSpec", flow: Flow | None = None, *, fuse: bool = True):
    """Layers as nodes, data flow as edges: a ``networkx.DiGraph`` ready for `render_spec`.

    A node lists its main tensor's shape, the group on its dims 0 and 1 and its frozen dims with
    their reasons; it is tinted with the colour of the group on its output (dim 0). An edge takes
    the colour of the group the two layers share (grey: none, e.g. a frozen interface). Without a
    ``flow`` (`layer_flow`) the edges follow state_dict order, an approximation. With ``fuse`` a
    layer holding only 1-D tensors (a norm) is drawn inside its single producer (conv + bn).

    Example::

        g = layer_graph(spec, layer_flow(model, x))
        g.nodes["0"]["label"]  # '0\\n[8, 4]  d0: 0  d1: .\\nfrozen d1: model input'
    """
    import networkx as nx

    colours = group_colours(spec)
    cells = defaultdict(list)
    for g in spec.groups:
        for a in g.axes:
            cells[(a.tensor, a.dim)].append(g.name)
    tensors = list(spec.shapes)
    if flow is None:
        order = list(dict.fromkeys(_layer_of([t]) for t in tensors))
        edges = list(zip(order, order[1:]))
    else:
        order, edges = list(flow.layers), list(flow.edges)
    members: dict[str, list[str]] = {layer: [] for layer in order}
    for t in tensors:
        best = max((layer for layer in order if t == layer or t.startswith(layer + ".")), key=len, default=None)
        if best is None:
            best = _layer_of([t])
            order.append(best)
        members.setdefault(best, []).append(t)
    graph = nx.DiGraph(caption=_caption(spec) + ("" if flow else "; edges follow state_dict order"),
                       legend=[(g.name, g.size, colours[g.name]) for g in spec.groups])
    for layer in ["input"] + order + ["output"]:
        if layer in ("input", "output") or layer.startswith("op:"):
            if any(layer in e for e in edges):
                label = layer[3:].split("#")[0] if layer.startswith("op:") else layer
                graph.add_node(layer, label=label, shape="ellipse", tensors=[], fill="#f2f2f2", border="#777777")
        elif layer not in graph:
            graph.add_node(layer, label=layer, tensors=list(members.get(layer, [])), parts=[layer])
    graph.add_edges_from(e for e in edges if e[0] in graph and e[1] in graph)
    if fuse:
        for v in list(order):
            preds = list(graph.predecessors(v)) if v in graph else []
            if (len(preds) != 1 or "parts" not in graph.nodes[preds[0]] or graph.out_degree(preds[0]) != 1
                    or not graph.nodes[v]["tensors"]
                    or any(len(spec.shapes[t]) > 1 for t in graph.nodes[v]["tensors"])):
                continue
            u = preds[0]
            graph.nodes[u]["tensors"] += graph.nodes[v]["tensors"]
            graph.nodes[u]["parts"] += graph.nodes[v]["parts"]
            graph.add_edges_from((u, w) for w in graph.successors(v))
            graph.remove_node(v)
    out_groups: dict[str, list[str]] = {}
    for node, data in graph.nodes(data=True):  # node order is data-flow order
        if "parts" in data:
            data.update(_layer_label(spec, data, cells, colours))
            out_groups[node] = [n for t in data["tensors"] for n in cells.get((t, 0), [])]
        else:
            out_groups[node] = list(dict.fromkeys(n for p in graph.predecessors(node) for n in out_groups.get(p, [])))
    for u, v, data in graph.edges(data=True):
        wanted = ([n for t in graph.nodes[v]["tensors"] for d in range(len(spec.shapes[t]))
                   for n in cells.get((t, d), [])] if "parts" in graph.nodes[v] else out_groups[u])
        shared = [n for n in out_groups[u] if n in wanted]
        data["colour"] = colours[shared[0]] if shared else "#999999"
        data["label"] = shared[0] if shared else ""
    return graph


def _names(groups: list[str], most: int = 2) -> str:
    return ",".join(groups[:most]) + (f" +{len(groups) - most}" if len(groups) > most else "") if groups else "."


def _layer_label(spec, data, cells, colours) -> dict[str, Any]:
    parts, tensors = data["parts"], data["tensors"]
    name = parts[0] + "".join(" + " + p.rsplit(".", 1)[-1] for p in parts[1:])
    lines = [name]
    main = max(tensors, key=lambda t: len(spec.shapes[t]), default=None)
    fill, border = "#ffffff", "#999999"
    if main is not None:
        shape = list(spec.shapes[main])
        dims = [f"d{d}: {_names(cells.get((main, d), []))}" for d in range(min(2, len(shape)))]
        lines.append(f"{shape}  " + "  ".join(dims))
        out = cells.get((main, 0), [])
        if out:
            fill, border = _tint(colours[out[0]]), colours[out[0]]
    frozen = {}
    for t in tensors:
        for f in spec.frozen_of(t):
            frozen.setdefault(_short(strip_location(f.reason)), set()).add(f.dim)
    for reason, dims in list(frozen.items())[:3]:
        lines.append(f"frozen d{','.join(map(str, sorted(dims)))}: {reason}")
    if len(frozen) > 3:
        lines.append(f"... {len(frozen) - 3} more frozen reasons")
    return {"label": "\n".join(lines), "fill": fill, "border": border, "dashed": fill == "#ffffff"}


def group_graph(spec: "PermutationSpec", *, max_members: int = 6):
    """The compact view: one node per group (name, size, member tensors), an edge between two
    groups that share a tensor, from the group on its input dims to the group on its dim 0
    (``both=True`` where two groups feed each other, e.g. a residual stream and a block's hidden units).

    Example::

        g = group_graph(spec)
        sorted(g.nodes)  # ['0'] for Linear(4, 8) -> ReLU -> Linear(8, 3)
    """
    import networkx as nx

    colours = group_colours(spec)
    graph = nx.DiGraph(caption=_caption(spec), legend=[])
    for g in spec.groups:
        names = list(dict.fromkeys(f"{a.tensor} d{a.dim}" for a in g.axes))
        lines = [f"group {g.name} (size {g.size}, {len(names)} axes)"] + names[:max_members]
        if len(names) > max_members:
            lines.append(f"... {len(names) - max_members} more")
        graph.add_node(g.name, label="\n".join(lines), fill=_tint(colours[g.name]), border=colours[g.name],
                       dashed=False, tensors=[a.tensor for a in g.axes])
    by_tensor: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for g in spec.groups:
        for a in g.axes:
            by_tensor[a.tensor].append((a.dim, g.name))
    for tensor, entries in by_tensor.items():
        outs = [n for d, n in entries if d == 0]
        ins = [n for d, n in entries if d != 0]
        for src in ins:
            for dst in outs or []:
                if src != dst:
                    data = graph.get_edge_data(src, dst) or {"tensors": []}
                    data["tensors"].append(tensor)
                    graph.add_edge(src, dst, **data)
    for u, v in list(graph.edges):  # a pair of groups feeding each other: one edge, both ways
        if graph.has_edge(v, u) and u < v:
            graph.edges[u, v]["tensors"] += graph.edges[v, u]["tensors"]
            graph.edges[u, v]["both"] = True
            graph.remove_edge(v, u)
    for u, v, data in graph.edges(data=True):
        n = len(data["tensors"])
        data.update(colour=colours[u], label=data["tensors"][0] if n == 1 else f"{n} tensors")
    return graph


def render_spec(spec: "PermutationSpec", path: str | Path, *, model: "nn.Module | None" = None,
                example_inputs: Any = None, flow: Flow | None = None, compact: bool = False) -> Path:
    """Write ``spec`` as a picture or graph file, chosen by ``path``'s extension: ``.dot``, ``.svg``
    or ``.png`` (``.json`` saves the spec itself). ``compact`` draws `group_graph`, else
    `layer_graph` with the data flow of ``model`` on ``example_inputs`` (or ``flow``).

    SVG and PNG come from graphviz's ``dot`` binary when it is on the PATH, else from matplotlib;
    with neither, the DOT file is written beside ``path`` and ``ImportError`` says what to
    install. Files are written atomically. Example::

        render_spec(spec, "spec.png", model=model, example_inputs=x)
        render_spec(spec, "groups.svg", compact=True)
    """
    from .spec import PermutationSpec
    from .viz_render import render_graph, write_atomic

    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"render_spec(spec=...) must be a PermutationSpec from autoperm.trace; got {type(spec).__name__}"
                        + (" (pass the spec first, the model as model=)" if hasattr(spec, "state_dict") else ""))
    if model is not None:  # a spec drawn on a model it was not compiled for: refused before writing
        spec.check_model(state_of(model, "render_spec(model=...)"))
    path = Path(path)
    if path.suffix.lower() == ".json":
        write_atomic(path, lambda tmp: spec.save(tmp))
        return path
    if compact:
        graph = group_graph(spec)
    else:
        if flow is None and model is not None:
            if example_inputs is None:
                raise ValueError("render_spec(model=...) also needs example_inputs= to record the data flow")
            flow = layer_flow(model, example_inputs)
        graph = layer_graph(spec, flow)
    return render_graph(graph, path)


def plot_curve(curves: "Curve | Mapping[str, Curve]", path: str | Path, *, key: str = "value",
               ylabel: str = "test accuracy (%)", scale: float = 100.0) -> Path:
    """Plot interpolation curves (one line per `Curve`, ``key`` times ``scale`` against alpha)
    to a PNG or SVG with matplotlib (``pip install "autoperm[viz]"``); written atomically.

    Example::

        curve = autoperm.interpolate(a, b, [0, 0.5, 1], evaluate=acc)
        plot_curve({"weight matching": curve}, "curve.png")
    """
    from .viz_render import pyplot, write_atomic

    curves = {"": curves} if not isinstance(curves, Mapping) else dict(curves)
    if not curves:
        raise ValueError("plot_curve(curves=...) is empty: pass a Curve (autoperm.interpolate) or a dict of "
                         "name -> Curve with at least one entry")
    bad = next((k for k, c in curves.items() if not hasattr(c, "alphas") or not hasattr(c, "series")), None)
    if bad is not None:
        raise TypeError(f"plot_curve(curves=...): {'entry ' + repr(bad) if bad else 'the argument'} is a "
                        f"{type(curves[bad]).__name__}, not a Curve (autoperm.interpolate returns one)")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        ax.plot(curve.alphas, [scale * v for v in curve.series(key)], marker="o", label=name or None)
    ax.set_xlabel("alpha (weight of model B)")
    ax.set_ylabel(ylabel)
    if any(curves):
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path
