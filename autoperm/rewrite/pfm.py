"""Preserve-First Merging (PFM; the Vanishing Feature paper, ../papers/003, section 4.4 and
Figure 4 right; DESIGN.md section 4).

Layers are counted as the paper counts them: the conv / linear nodes of model_a's traced graph
in topological order, shortcut projections excluded (`counted_layers`). With ``preserve_first=l``
the *preserved part* is the first l counted layers (in a chain: the l-th and its ancestors; in a
model with branches or several heads, every one of the first l), all their ancestors, and every later op that is not
a conv / linear and reads only preserved values (the layer's BatchNorm and activation, a residual
add whose two inputs are preserved ...): merging happens at the *inputs* of the next layers, as
in Figure 4 ("outputs of the l-th layers are merged").

The emitted module runs the preserved part twice on the same input, once with model_a's weights
and once with model_b's aligned (permuted) weights; every value that flows from the preserved part
into the rest is merged by ``(1 - alpha) * a + alpha * b`` (``aten.lerp``); the rest runs on the
interpolated weights. Ops that read only parameters are recomputed in each copy with that copy's
weights. ``l = 0`` is the full merge; ``l >= L`` (the number of counted layers) duplicates the
whole graph and averages the outputs: exactly the ensemble. Merge nodes are folded into weights
where that is exact (`pfm_fold`): the coefficients ``1 - alpha`` and ``alpha`` go into the last
affine op of each preserved copy (model_a's copy of that layer then stores its weights times
``1 - alpha``; ``module.autoperm_pfm["folded"]`` lists them) and the merge is a plain add.

Normalization touches the merged part only (Figure 4 right: "Normalization is applied to the
merged layers"; Table 1): ``normalize="reset"`` recomputes the running statistics of the merged
copy's BatchNorms on data (train-mode batch statistics, averaged over the batches, as
`autoperm.merge.reset_batchnorm`). ``normalize="repair"`` / ``"rescale"`` (`pfm_normalize`) set
each merged conv / linear layer's per-channel pre-activation mean and std (RESCALE: std only) to
the interpolation ``(1 - alpha, alpha)`` of model_a's and aligned model_b's at that layer, measured
on data, folded into the layer's weight and bias; a merged layer feeding a BatchNorm is left alone
and that BatchNorm gets the exact statistics instead (as the plain REPAIR). Preserved layers and
BatchNorms keep the endpoints' weights and statistics; ``l = 0`` gives the plain merge's result.

Example (the paper's Table 1 setting, on any model)::

    pfm = autoperm.merge(model_a, model_b, preserve_first=8, normalize="repair", data=loader)
    param_count(pfm) / param_count(model_a)     # e.g. 1.2 for VGG16 with l = 8
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..merge.bias import DENSE_OPS, weight_key
from ..merge.normalize import reset_graph_batchnorm
from ..frontend import TracedGraph
from .emit import buffer_keys, emit, output_spec
from .pfm_fold import fold_plan, scale_folded
from ..rules.base import packet_name as _packet

__all__ = ["dense_nodes", "shortcut_projections", "counted_layers", "preserved_nodes", "build_pfm",
           "reference_pfm"]

log = logging.getLogger(__name__)

_BN = "_native_batch_norm_legit_no_training"
CONTEXTS = ("model_a", "model_b", "merged")


def _inputs_of(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(dict.fromkeys(node.all_input_nodes))


def data_nodes(tg: TracedGraph) -> set[torch.fx.Node]:
    """Nodes whose value depends on a user input (placeholders of the inputs included)."""
    out: set[torch.fx.Node] = set()
    for node in tg.graph.nodes:
        if (node.op == "placeholder" and node.name in tg.user_inputs) or (
                node.op == "call_function" and any(p in out for p in node.all_input_nodes)):
            out.add(node)
    return out


def dense_nodes(tg: TracedGraph) -> list[torch.fx.Node]:
    """conv / linear nodes whose weight is a state_dict tensor or computed from such tensors
    alone (``weight_norm``), in topological order."""
    return [n for n in tg.graph.nodes if n.op == "call_function" and _packet(n) in DENSE_OPS
            and weight_key(tg, n) is not None]


def _is_residual_add(node: torch.fx.Node, data: set) -> bool:
    return _packet(node) in ("add", "add_") and sum(isinstance(a, torch.fx.Node) and a in data
                                                    for a in node.args[:2]) == 2


def _dense_depth(tg: TracedGraph, start: torch.fx.Node, blocked: torch.fx.Node, dense: set) -> dict:
    """For nodes reachable from ``start`` without passing ``blocked``: the largest number of
    conv / linear nodes on such a path (the node itself included)."""
    depth: dict[torch.fx.Node, int] = {start: 0}
    for node in tg.graph.nodes:
        if node is blocked or node is start:
            continue
        got = [depth[p] for p in node.all_input_nodes if p in depth]
        if got:
            depth[node] = max(got) + (node in dense)
    return depth


def shortcut_projections(tg: TracedGraph) -> set[torch.fx.Node]:
    """Shortcut projections, found from the graph alone (never from module names).

    The rule: a conv / linear node ``c`` with data input ``x`` is a shortcut projection when its
    output reaches a residual add (an add of two data-dependent values) through ops that have a
    single data input and are not conv / linear (BatchNorm, getitem ...), and the add's other
    operand depends on ``x`` through a path that avoids ``c`` and holds at least two conv / linear
    layers (more than the one on ``c``'s branch): ResNet's 1x1 downsampling conv, not the stem
    conv nor a block's last conv.
    """
    data = data_nodes(tg)
    dense = dense_nodes(tg)
    dense_set = set(dense)
    out: set[torch.fx.Node] = set()
    for c in dense:
        x = c.args[0]
        if not isinstance(x, torch.fx.Node):
            continue
        adds, frontier, seen = [], [c], {c}
        while frontier:
            n = frontier.pop()
            for u in n.users:
                if u in seen or u.op != "call_function":
                    continue
                seen.add(u)
                if _is_residual_add(u, data):
                    adds.append((u, n))
                elif u not in dense_set and sum(p in data for p in u.all_input_nodes) == 1:
                    frontier.append(u)
        if not adds:
            continue
        depth = _dense_depth(tg, x, c, dense_set)
        for add, via in adds:
            other = [a for a in add.args[:2] if isinstance(a, torch.fx.Node) and a is not via]
            if other and depth.get(other[0], 0) >= 2:
                out.add(c)
                break
    return out


def counted_layers(tg: TracedGraph) -> list[torch.fx.Node]:
    """The layers PFM counts: conv / linear nodes in topological order, shortcut projections
    excluded (the paper, Appendix A.3 "Merging Details")."""
    skip = shortcut_projections(tg)
    return [n for n in dense_nodes(tg) if n not in skip]


def preserved_nodes(tg: TracedGraph, preserve_first: int) -> set[torch.fx.Node]:
    """The preserved part for ``preserve_first=l`` (see the module docstring); empty for l = 0."""
    layers = counted_layers(tg)
    if preserve_first <= 0 or not layers:
        return set()
    first = layers[:min(preserve_first, len(layers))]  # with branches or heads the l-th alone misses some
    data = data_nodes(tg)
    dense = set(dense_nodes(tg))
    keep: set[torch.fx.Node] = set(first)
    stack = list(first)
    while stack:
        for p in stack.pop().all_input_nodes:
            if p in data and p not in keep and p.op != "placeholder":
                keep.add(p)
                stack.append(p)
    for node in tg.graph.nodes:  # forward closure: ops reading only preserved values
        if node in keep or node not in data or node.op != "call_function" or node in dense:
            continue
        ins = [p for p in node.all_input_nodes if p in data]
        if ins and all(p in keep or p.op == "placeholder" for p in ins) and any(p in keep for p in ins):
            keep.add(node)
    return keep


def _is_float_tensor(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def build_pfm(tg: TracedGraph, preserved: set[torch.fx.Node], alpha: float, b_constants: Iterable[str] = (),
              folded: Iterable[str] = ()) -> tuple[torch.fx.Graph, dict[str, list[torch.fx.Node]]]:
    """The PFM graph: get_attr targets are ``"<context>.<state key>"`` (contexts ``model_a``,
    ``model_b``, ``merged``) or, for keyless constants, ``"_constants.<placeholder>"`` (model_a's
    value, also used by the merged part, as in `autoperm.merge`) and ``"_constants_b.<placeholder>"``
    for those named in ``b_constants`` (model_b's value differs). Also returns the BatchNorm nodes
    of the merged context (for RESET) as ``{"merged_bn": [...]}``. The merges of the nodes named
    in ``folded`` are plain adds (their coefficients are in the weights: `pfm_fold`)."""
    b_constants, folded = set(b_constants), set(folded)
    graph = torch.fx.Graph()
    data = data_nodes(tg)
    env: dict[tuple[str, torch.fx.Node], Any] = {}
    merges: dict[torch.fx.Node, torch.fx.Node] = {}
    merged_bn: list[torch.fx.Node] = []
    inputs = {n: graph.node_copy(n) for n in tg.graph.nodes if n.op == "placeholder" and n.name in tg.user_inputs}

    def value(ctx: str, node: torch.fx.Node):
        if node in inputs:
            return inputs[node]
        if ctx == "merged" and node in preserved:
            if node not in merges:
                a, b = value("model_a", node), value("model_b", node)
                if _is_float_tensor(node) and node.name in folded:
                    merges[node] = graph.call_function(torch.ops.aten.add.Tensor, (a, b))
                    merges[node].meta = {"val": node.meta.get("val"), "autoperm": f"merge of {node.name} (folded)"}
                elif _is_float_tensor(node):
                    merges[node] = graph.call_function(torch.ops.aten.lerp.Scalar, (a, b, float(alpha)))
                    merges[node].meta = {"val": node.meta.get("val"), "autoperm": f"merge of {node.name}"}
                else:  # shapes and other non-float values are the same in both copies
                    merges[node] = a
            return merges[node]
        if ctx != "merged" and node in data and node not in preserved:
            raise AssertionError(f"{node.name} is not preserved but read by the {ctx} copy")
        key = (ctx, node)
        if key not in env:
            if node.op == "placeholder":
                if node.name in tg.state_keys:
                    target = f"{ctx}.{tg.state_keys[node.name]}"
                else:
                    target = f"_constants{'_b' if ctx == 'model_b' and node.name in b_constants else ''}.{node.name}"
                new = graph.get_attr(target)
            else:
                args = torch.fx.node.map_arg(node.args, lambda n: value(ctx, n))
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: value(ctx, n))
                name = node.name if ctx == "merged" else f"{ctx[-1]}_{node.name}"
                new = graph.create_node(node.op, node.target, args, kwargs, name=name)
                if ctx == "merged" and _packet(node) == _BN:
                    merged_bn.append(new)
            new.meta = dict(node.meta)
            env[key] = new
        return env[key]

    for node in tg.graph.nodes:
        if node.op == "output":
            graph.output(torch.fx.node.map_arg(node.args[0], lambda n: value("merged", n)))
        elif node.op == "call_function" and node in data:
            value("model_a" if node in preserved else "merged", node)
            if node in preserved:
                value("model_b", node)
    return graph, {"merged_bn": merged_bn}


@torch.no_grad()
def reference_pfm(tg: TracedGraph, states: Mapping[str, Mapping[str, torch.Tensor]], preserved: set,
                  alpha: float, inputs: tuple[torch.Tensor, ...],
                  b_constants: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """PFM evaluated directly on the traced graph (an interpreter with three value tables), the
    oracle the emitted module is checked against. ``states`` maps each context to a state dict;
    ``b_constants`` gives model_b's keyless constants (default: model_a's)."""
    b_constants = b_constants or {}
    env: dict[str, dict] = {c: {} for c in CONTEXTS}
    user = dict(zip(tg.user_inputs, inputs))

    def get(ctx, node):
        if node.name in user:
            return user[node.name]
        if ctx == "merged" and node in preserved:
            a, b = get("model_a", node), get("model_b", node)
            return torch.lerp(a, b, float(alpha)) if _is_float_tensor(node) else a
        if node not in env[ctx]:
            if node.op == "placeholder":
                env[ctx][node] = (states[ctx][tg.state_keys[node.name]] if node.name in tg.state_keys
                                  else b_constants.get(node.name, tg.constants[node.name]) if ctx == "model_b"
                                  else tg.constants[node.name])
            else:
                args = torch.fx.node.map_arg(node.args, lambda n: get(ctx, n))
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: get(ctx, n))
                env[ctx][node] = node.target(*args, **kwargs)
        return env[ctx][node]

    out = next(n for n in tg.graph.nodes if n.op == "output")
    return list(torch.fx.node.map_arg(out.args[0], lambda n: get("merged", n)))


def pfm_module(model_a: nn.Module, tg: TracedGraph, states: Mapping[str, Mapping[str, torch.Tensor]],
               preserve_first: int, alpha: float, inputs: tuple[torch.Tensor, ...], outputs: Any,
               normalize: str | None = None, data: Iterable | None = None,
               b_constants: Mapping[str, torch.Tensor] | None = None,
               grouped: set[str] | None = None, fold: bool = True, ridge: float | None = None) -> torch.fx.GraphModule:
    """Emit the PFM module for already aligned and interpolated ``states`` (see `pfm_merge` in
    `autoperm.rewrite`), checked against `reference_pfm` on ``inputs``, then normalized
    (``grouped``: the weight keys whose output dim is grouped, for REPAIR / RESCALE). With
    ``fold``, merge nodes are folded into the preserved layers' weights where exact (`pfm_fold`)."""
    layers = counted_layers(tg)
    if not layers:
        raise ValueError("preserve_first: the model has no conv / linear layer to count")
    if preserve_first > len(layers):
        log.info("preserve_first=%d >= %d counted layers: the whole model is preserved (the ensemble)",
                 preserve_first, len(layers))
    preserved = preserved_nodes(tg, preserve_first)
    b_constants = {k: v for k, v in (b_constants or {}).items()
                   if not (v.shape == tg.constants[k].shape and torch.equal(v, tg.constants[k]))}
    plan = fold_plan(tg, preserved, alpha) if fold else {}
    graph, info = build_pfm(tg, preserved, alpha, b_constants, plan)
    tensors: dict[str, torch.Tensor] = {f"_constants.{k}": v for k, v in tg.constants.items()}
    tensors.update({f"_constants_b.{k}": v for k, v in b_constants.items()})
    buffers = set()
    bufs = buffer_keys(model_a)
    for ctx in CONTEXTS:
        for key, t in states[ctx].items():
            tensors[f"{ctx}.{key}"] = t
            if key in bufs:
                buffers.add(f"{ctx}.{key}")
    scale_folded(tensors, plan, alpha)
    log.info("PFM: %d of %d merge nodes folded into the preserved layers' weights", len(plan),
             sum(1 for n in graph.nodes if str(n.meta.get("autoperm", "")).startswith("merge of")))
    names = {n.name for n in info["merged_bn"]}
    module = emit(graph, tensors, buffers=buffers, out_spec=output_spec(outputs),
                  static_batch=None if tg.dynamic_batch else inputs[0].shape[0], class_name="PFMModule")
    ref = reference_pfm(tg, states, preserved, alpha, inputs, b_constants)
    from .emit import check_module

    check_module(module, inputs, ref)
    if normalize == "reset":
        reset_graph_batchnorm(module, [n for n in names if n in {m.name for m in module.graph.nodes}],
                              data, len(inputs))
    elif normalize == "regression":
        from .pfm_normalize import regress_merged

        regress_merged(module, tg, states, data, alpha, len(inputs), ridge=ridge, b_constants=b_constants)
    elif normalize in ("repair", "rescale"):
        from .pfm_normalize import repair_merged

        repair_merged(module, tg, states, set(grouped or ()), data, alpha, normalize, len(inputs),
                      b_constants=b_constants)
    module.autoperm_pfm = {"preserve_first": int(preserve_first), "counted_layers": len(layers),
                           "layers": [n.name for n in layers], "alpha": float(alpha),
                           "folded": {k: list(v) for k, v in plan.items()}}
    return module
