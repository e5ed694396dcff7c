"""Normalization of a partial merge's widened model (Partial Model Merging thesis, ../papers/004,
section 4.2; `autoperm.rewrite.partial`): RESET / REPAIR / RESCALE with goal statistics per unit
(`normalize_widened`), and autoperm's regression refit (`regress_widened`,
`autoperm.merge.regression`). For a widened unit the goal is the interpolation of A's and B's
unit where the two are matched, and the unit's own model's where it is kept unmatched.

Example (what ``partial_merge(..., normalize="regression", data=batches)`` runs)::

    regress_widened(module, tg, tg_w, spec, ext, state_a, state_b, state, batches, 0.5, None)
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .partial_graph import param_layouts
from .partial_widen import widen_dim

__all__ = ["normalize_widened", "regress_widened"]

log = logging.getLogger(__name__)


def normalize_widened(module, tg, tg_w, spec, ext, state_a, state_b, state, data, alpha, mode) -> None:
    """RESET / REPAIR / RESCALE on the widened model (thesis section 4.2): a matched unit's goal
    statistics interpolate A's and B's, an unmatched unit keeps its own model's."""
    from ..merge.repair import channel_moments, find_layers, repair_state

    to_new = {v: k for k, v in getattr(module, "autoperm_keys", {}).items()}
    n_inputs = len(tg.user_inputs)  # tensors per batch that are the forward's inputs
    lays = param_layouts(spec)
    grouped = {k for k, d in lays.items() if 0 in d}
    layers = find_layers(tg_w, grouped)
    goal: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if mode in ("repair", "rescale"):
        dense = [lay for lay in find_layers(tg, grouped) if lay.kind == "dense"]
        ma, mb = (channel_moments(tg, s, data, dense, n_inputs) for s in (state_a, state_b))
        for lay in dense:
            ia, ib, mask, _ = widen_dim(state_a[lay.weight].shape[0], lays[lay.weight][0], ext)
            (mu_a, sd_a), (mu_b, sd_b) = ma[lay.node], mb[lay.node]
            goal[lay.node] = (_mix(mu_a[ia.clamp_min(0)], mu_b[ib.clamp_min(0)], mask, alpha),
                              _mix(sd_a[ia.clamp_min(0)], sd_b[ib.clamp_min(0)], mask, alpha))
    layers = [lay for lay in layers if lay.kind == "batchnorm" or lay.node in goal]
    state = repair_state(tg_w, dict(state), layers, data, goal, mode="rescale" if mode == "rescale" else "repair",
                         n_inputs=n_inputs)
    own = module.state_dict()
    module.load_state_dict({to_new.get(k, k): v for k, v in state.items() if to_new.get(k, k) in own}, strict=False)
    log.info("partial merge: %s on %d layers", mode, len(layers))


def _mix(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.where(mask == 3, (1 - alpha) * x + alpha * y, torch.where(mask == 2, y, x))


def regress_widened(module, tg, tg_w, spec, ext, state_a, state_b, state, data, alpha, ridge) -> None:
    """``normalize="regression"`` on the widened model: each conv / linear layer refit so that its
    output matches, unit by unit, the interpolation of A's and B's matched units and the unmatched
    units' own model's output (`autoperm.merge.regression`)."""
    from ..merge.regression import DEFAULT_RIDGE, find_fit_layers, regression_state

    lays = param_layouts(spec)

    def mix(layer, values):
        za, zb = (v.double() for v in values)
        if 0 not in lays.get(layer.weight, {}):
            return (1 - alpha) * za + alpha * zb
        ia, ib, mask, _ = widen_dim(state_a[layer.weight].shape[0], lays[layer.weight][0], ext)
        dim = 1 if layer.conv is not None or layer.bn is not None else za.dim() - 1
        shape = [1] * za.dim()
        shape[dim] = -1
        return _mix(za.index_select(dim, ia.clamp_min(0)), zb.index_select(dim, ib.clamp_min(0)),
                    mask.reshape(shape), alpha)

    to_new = {v: k for k, v in getattr(module, "autoperm_keys", {}).items()}
    # the goals are read in model_a's graph: tg_w is its node-for-node copy (fx may rename a node,
    # and a widened view becomes a reshape)
    pairs = list(zip(tg_w.graph.nodes, tg.graph.nodes, strict=True))
    if any(nw.op != no.op for nw, no in pairs):
        raise AssertionError("partial merge: the widened graph is not a node-for-node copy of model_a's")
    old_of = {nw.name: no.name for nw, no in pairs}
    layers = [dataclasses.replace(lay, target=old_of[lay.target]) for lay in find_fit_layers(tg_w)]
    state = regression_state(tg_w, dict(state), layers, data, [(tg, state_a), (tg, state_b)], mix,
                             ridge=DEFAULT_RIDGE if ridge is None else ridge, n_inputs=len(tg.user_inputs))
    own = module.state_dict()
    module.load_state_dict({to_new.get(k, k): v for k, v in state.items() if to_new.get(k, k) in own}, strict=False)
    log.info("partial merge: regression on %d layers", len(layers))
