"""REPAIR / RESCALE for Preserve-First Merging (the Vanishing Feature paper, ../papers/003, section
4.4 and Figure 4 right: "Normalization is applied to the merged layers"; Table 1's REPAIR /
RESCALE columns; DESIGN.md section 4).

Only the merged part of the emitted PFM module is touched (also by ``normalize="regression"``,
`regress_merged`: each merged conv / linear layer refit so that its output on the PFM module's own
inputs matches the interpolation of the endpoints' outputs there, `autoperm.merge.regression`). For every merged conv / linear layer
whose output channels form a group (never the model's output layer), the goal per-channel
statistics of its pre-activation output are ``(1 - alpha) * (E_A, Std_A) + alpha * (E_B, Std_B)``,
measured at that layer in the endpoints (model_a and aligned model_b, run whole on ``data``);
the PFM module's own statistics there are then set to the goal, layer by layer in graph order,
and folded into that layer's weight and bias (`autoperm.merge.repair.repair_state`; RESCALE
matches the std only). A merged layer that feeds a BatchNorm is left alone and the merged
BatchNorm's running statistics are set to the PFM module's exact statistics on ``data``, as the
plain REPAIR does. The preserved copies (``model_a.*`` / ``model_b.*`` keys) are never changed,
and no module is added.

The correction runs on the emitted module's own graph (its ``get_attr`` nodes turned into
placeholders, `pfm_traced`), so the statistics measured are those of the module returned; with
``preserve_first=0`` the result is the plain ``merge(..., normalize="repair")``.

The data-free columns of the paper's Table 1 act on the merged part's biases before the module
is built (`bias_merged`): ``"bias_calibration"`` (Table 1's "Bias Cal.", section 4.3) sets the
bias of a merged layer at merge depth ``d`` to ``(1 - alpha)^d * b_A + alpha^d * b_B``; the
merge depth counts the merge node as one merging step (`autoperm.merge.bias.count_layers` with
the preserved nodes), so the first merged layer after the boundary has depth 2. ``"bias_removal"``
zeroes the merged biases among the last ``bias_layers`` counted layers of the model (the plain
merge's count, ``bias_layers`` in 1..L). With ``preserve_first=0`` both are the plain merge's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Mapping

import torch

from ..frontend import TracedGraph
from ..merge.bias import calibrate_biases, count_layers, remove_biases
from ..merge.regression import DEFAULT_RIDGE, find_fit_layers, regression_state
from ..merge.repair import channel_moments, find_layers, repair_state

__all__ = ["bias_merged", "pfm_traced", "repair_merged", "regress_merged", "with_constants"]

log = logging.getLogger(__name__)


def bias_merged(tg: TracedGraph, preserved: Iterable[torch.fx.Node], states: Mapping[str, Mapping[str, torch.Tensor]],
                alpha: float, normalize: str, bias_layers: int | None = None) -> dict[str, torch.Tensor]:
    """The ``"merged"`` state of PFM with its merged layers' biases calibrated by merge depth
    (``normalize="bias_calibration"``) or, among the model's last ``bias_layers`` counted layers,
    zeroed (``"bias_removal"``; all with None); the preserved copies are not touched (module
    docstring).

    Example (an MLP of 3 linear layers, the first preserved; merge depths 2 and 3)::

        state = bias_merged(tg, preserved_nodes(tg, 1), states, 0.5, "bias_calibration")
        # state["1.bias"] = 0.25 * (b_A + b_B), state["2.bias"] = 0.125 * (b_A + b_B)
    """
    merged = states["merged"]
    if normalize == "bias_removal":  # the preserved layers' keys in "merged" are never read
        return remove_biases(merged, count_layers(tg), bias_layers)
    layers = count_layers(tg, {n.name for n in preserved})
    if not layers:
        log.info("bias calibration: every conv / linear layer is preserved; no merged bias to change")
        return dict(merged)
    return calibrate_biases(merged, [states["model_a"], states["model_b"]], [1.0 - alpha, alpha], layers)


def pfm_traced(module: torch.fx.GraphModule) -> TracedGraph:
    """The emitted module's graph as a `TracedGraph`: every ``get_attr`` becomes a placeholder
    named like the node it replaces (so node names are kept), keyed by the module's state_dict
    key; non-persistent buffers become constants."""
    persistent = set(module.state_dict())
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    state_keys: dict[str, str] = {}
    constants: dict[str, torch.Tensor] = {}
    user: list[str] = []
    for node in module.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node)
            user.append(env[node].name)
    for node in module.graph.nodes:
        if node.op != "get_attr":
            continue
        new = env[node] = graph.placeholder(node.name)
        new.meta = dict(node.meta)
        if node.target in persistent:
            state_keys[new.name] = node.target
        else:
            constants[new.name] = module.get_buffer(node.target)
    for node in module.graph.nodes:
        if node.op not in ("placeholder", "get_attr"):
            env[node] = graph.node_copy(node, lambda n: env[n])
    renamed = [n.name for n in module.graph.nodes if n.name != env[n].name]
    if renamed:  # cannot happen: the names come from one graph
        raise AssertionError(f"PFM graph copy renamed nodes: {renamed[:3]}")
    return TracedGraph(graph_module=torch.fx.GraphModule(torch.nn.Module(), graph), state_keys=state_keys,
                       keyless={k: "non-persistent buffer" for k in constants}, user_inputs=user, shapes={},
                       constants=constants)


@torch.no_grad()
def with_constants(tg: TracedGraph, constants: Mapping[str, torch.Tensor] | None) -> TracedGraph:
    """``tg`` with some keyless constants replaced (model_b's own, for its goal statistics)."""
    return dataclasses.replace(tg, constants={**tg.constants, **constants}) if constants else tg


def repair_merged(module: torch.fx.GraphModule, tg: TracedGraph, states: Mapping[str, Mapping[str, torch.Tensor]],
                  grouped: set[str], data: Iterable, alpha: float, mode: str, n_inputs: int = 1,
                  b_constants: Mapping[str, torch.Tensor] | None = None) -> None:
    """REPAIR / RESCALE of the merged part of an emitted PFM ``module`` (in place; see the module
    docstring). ``tg`` is model_a's traced graph, ``states`` holds ``model_a`` / ``model_b``
    (aligned) state dicts, ``grouped`` the state_dict keys of weights whose output dim is grouped."""
    if mode not in ("repair", "rescale"):
        raise ValueError(f"repair_merged: mode must be 'repair' or 'rescale', got {mode!r}")
    data = list(data)
    if not data:
        raise ValueError(f"normalize={mode!r} got no batches in data")
    original = getattr(module, "autoperm_keys", {})  # module key -> "<context>.<key>"
    new_of = {orig: new for new, orig in original.items()}
    tg_p = pfm_traced(module)
    merged_grouped = {new_of[f"merged.{k}"] for k in grouped if f"merged.{k}" in new_of}
    layers = [lay for lay in find_layers(tg_p, merged_grouped)
              if lay.kind == "dense" or original.get(lay.running_mean, "").startswith("merged.")]
    dense = [lay for lay in layers if lay.kind == "dense"]
    # the merged copy of a node keeps the node's name (`build_pfm`): goal sites in model_a's graph
    sites = {lay.node: lay for lay in find_layers(tg, grouped) if lay.kind == "dense"}
    for lay in dense:
        site = sites.get(lay.node)
        if site is None or original.get(lay.weight) != f"merged.{site.weight}":
            raise AssertionError(f"PFM {mode}: merged layer {lay.node} ({original.get(lay.weight)}) has no "
                                 "matching layer in model_a's graph")
    goal: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if dense:
        wanted = [sites[lay.node] for lay in dense]
        ma = channel_moments(tg, states["model_a"], data, wanted, n_inputs)
        mb = channel_moments(with_constants(tg, b_constants), states["model_b"], data, wanted, n_inputs)
        goal = {n: ((1 - alpha) * ma[n][0] + alpha * mb[n][0], (1 - alpha) * ma[n][1] + alpha * mb[n][1])
                for n in ma}
    if not layers:
        log.info("normalize=%r: the merged part has no layer to normalize (everything is preserved)", mode)
        return
    state = {k: v.detach() for k, v in module.state_dict().items()}
    state = repair_state(tg_p, state, layers, data, goal, mode=mode, n_inputs=n_inputs)
    module.load_state_dict(state)
    log.info("PFM %s: %d merged conv / linear layers, %d merged BatchNorm layers", mode, len(dense),
             len(layers) - len(dense))


@torch.no_grad()
def regress_merged(module: torch.fx.GraphModule, tg: TracedGraph, states: Mapping[str, Mapping[str, torch.Tensor]],
                   data: Iterable, alpha: float, n_inputs: int = 1, ridge: float | None = None,
                   b_constants: Mapping[str, torch.Tensor] | None = None) -> None:
    """``normalize="regression"`` on the merged part of an emitted PFM ``module`` (in place): each
    merged conv / linear layer, in graph order, refit by ridge regression so that its output on the
    module's own inputs (the merge nodes' values, then the refit layers before it) matches
    ``(1 - alpha) Z_A + alpha Z_B``, the endpoints' outputs at that layer in model_a's graph ``tg``
    (`autoperm.merge.regression`). The preserved copies are never changed."""
    data = list(data)
    if not data:
        raise ValueError("normalize='regression' got no batches in data")
    original = getattr(module, "autoperm_keys", {})  # module key -> "<context>.<key>"
    tg_p = pfm_traced(module)
    merged_keys = {k for k, orig in original.items() if orig.startswith("merged.")}
    layers = find_fit_layers(tg_p, merged_keys)
    nodes = {n.name: n for n in tg.graph.nodes}
    for lay in layers:  # the merged copy of a node keeps the node's name (`build_pfm`)
        own = nodes.get(lay.node)
        weight = tg.state_keys.get(getattr(own.args[1], "name", None)) if own is not None and len(own.args) > 1 else None
        if lay.target not in nodes or original.get(lay.weight) != f"merged.{weight}":
            raise AssertionError(f"PFM regression: merged layer {lay.node} ({original.get(lay.weight)}) has no "
                                 "matching layer in model_a's graph")
    if not layers:
        log.info("normalize='regression': the merged part has no layer to refit (everything is preserved)")
        return
    state = {k: v.detach() for k, v in module.state_dict().items()}
    endpoints = [(tg, states["model_a"]), (with_constants(tg, b_constants), states["model_b"])]
    state = regression_state(tg_p, state, layers, data, endpoints,
                             [1 - alpha, alpha], ridge=DEFAULT_RIDGE if ridge is None else ridge, n_inputs=n_inputs)
    module.load_state_dict(state)
    log.info("PFM regression: %d merged conv / linear layers refit", len(layers))

