"""REPAIR and RESCALE (Jordan et al.; the Vanishing Feature paper, ../papers/003, Equation 1,
section 4.3 and Appendix A.3, Algorithms 1-2), fused into the merged model's own weights.

For every conv / linear layer whose output channels form a group (never the model's output
layer), the merged model's pre-activation statistics per channel are set to the interpolation
of the endpoints':

* REPAIR: ``f <- (f - E[f]) / Std[f] * Std_goal + E_goal`` (weights and bias rescaled, bias
  shifted); a layer without a bias is rescaled only, and logged;
* RESCALE: ``f <- f / Std[f] * Std_goal`` (weights and bias rescaled);

with ``E_goal = (1 - alpha) E_A + alpha E_B`` and likewise ``Std_goal``. A layer that feeds a
BatchNorm is left alone; that BatchNorm's running statistics are recomputed instead (RESET).
Layers are processed in graph order, each measured after the corrections before it, so the
result is exact on the data; no module is added. All batches advance through the graph together
and stop at each layer (`autoperm.merge.staged`), so the data is run through once, not once per
layer (unless the values held at once would exceed 2 GiB).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch

from .._data import check_samples, stat_inputs
from .._progress import progress
from .._stats import run_graph
from ..frontend import TracedGraph
from ..rules.base import packet_name as _packet
from .staged import STAGED_BYTES, StagedRun, try_one_pass

__all__ = ["Layer", "find_layers", "channel_moments", "repair_state"]

log = logging.getLogger(__name__)

_DENSE = {"linear": -1, "conv1d": 1, "conv2d": 1, "conv3d": 1}
_BN = {"_native_batch_norm_legit_no_training", "batch_norm"}


@dataclass(frozen=True)
class Layer:
    """A site to normalize: a dense layer (weight / bias keys) or a BatchNorm (running stats)."""

    node: str          # node whose output (dense) or input (BatchNorm) is measured
    channel_dim: int
    kind: str          # "dense" or "batchnorm"
    weight: str | None = None
    bias: str | None = None
    running_mean: str | None = None
    running_var: str | None = None


def find_layers(tg: TracedGraph, grouped: set[str]) -> list[Layer]:
    """Dense layers whose weight's output dim is grouped (``grouped`` holds those weight keys)
    and BatchNorms with running statistics, in graph order."""
    layers = []
    key = tg.state_keys
    for node in tg.graph.nodes:
        name = _packet(node)
        args = node.args
        if name in _DENSE and len(args) > 1 and getattr(args[1], "name", None) in key:
            w = key[args[1].name]
            b = key.get(getattr(args[2], "name", None)) if len(args) > 2 and args[2] is not None else None
            feeds_bn = node.users and all(_packet(u) in _BN for u in node.users)
            if w in grouped and not feeds_bn:
                layers.append(Layer(node.name, _DENSE[name], "dense", w, b))
        elif name in _BN and len(args) > 4 and all(getattr(a, "name", None) in key for a in args[3:5]):
            layers.append(Layer(args[0].name, 1, "batchnorm", running_mean=key[args[3].name],
                                running_var=key[args[4].name]))
    return layers


class _Moments:
    """Running per-channel count, sum and sum of squares (float64) of one node's values."""

    def __init__(self, dim: int) -> None:
        self.dim, self.n, self.s, self.sq = dim, 0, 0.0, 0.0

    def add(self, t: torch.Tensor) -> None:
        f = t.movedim(self.dim, -1).reshape(-1, t.shape[self.dim]).double()
        self.n += f.shape[0]
        self.s = self.s + f.sum(0)
        self.sq = self.sq + (f * f).sum(0)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        return mean, (self.sq / self.n - mean * mean).clamp_min(0).sqrt()


def channel_moments(tg: TracedGraph, state, data: Iterable, layers: list[Layer],
                    n_inputs: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std (float64, population) at each layer's node over ``data``."""
    sums: dict[str, _Moments] = {}
    wanted = {l.node for l in layers}
    dims = {l.node: l.channel_dim for l in layers}
    samples = 0
    for batch in progress(data, desc="channel statistics"):
        x = stat_inputs(batch, n_inputs, "normalization statistics")
        samples += x[0].shape[0]
        for node, t in run_graph(tg, state, x, wanted).items():
            sums.setdefault(node, _Moments(dims[node])).add(t)
    check_samples(samples, "normalization statistics")
    return {node: m.result() for node, m in sums.items()}


def _corrected(layer: Layer, state, mean: torch.Tensor, std: torch.Tensor, goal, mode: str,
               eps: float) -> dict[str, torch.Tensor]:
    """The state tensors that correct ``layer``, given its measured per-channel mean and std."""
    if layer.kind == "batchnorm":
        rm = state[layer.running_mean]
        return {layer.running_mean: mean.to(rm.dtype), layer.running_var: (std * std).to(rm.dtype)}
    g_mean, g_std = goal[layer.node]
    scale = g_std / (std + eps)
    w = state[layer.weight]
    out = {layer.weight: w * scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))}
    if layer.bias is not None:
        b = state[layer.bias]
        shifted = (b.double() - mean) * scale + g_mean if mode == "repair" else b.double() * scale
        out[layer.bias] = shifted.to(b.dtype)
    elif mode == "repair":
        log.info("layer %s has no bias: REPAIR rescaled it without shifting the mean", layer.weight)
    return out


def _in_graph_order(tg: TracedGraph, layers: list[Layer]) -> list[Layer]:
    """Layers by the graph position of their measured node, a dense layer before a BatchNorm
    measured at the same node (the dense correction changes that node's values): a correction
    changes only its own node (dense) or a later one (the BatchNorm after its measured input),
    so each measurement then sees every correction before it in the graph, in either way of
    running."""
    where = {n.name: i for i, n in enumerate(tg.graph.nodes)}
    return sorted(layers, key=lambda l: (where[l.node], l.kind != "dense"))


def _read_before(tg: TracedGraph, layers: list[Layer]) -> str | None:
    """A tensor some layer corrects that a node at or before its measured node also reads (tied
    weights: one pass would have run that node with the uncorrected tensor), or None."""
    where = {n.name: i for i, n in enumerate(tg.graph.nodes)}
    readers: dict[str, list[str]] = {}
    for n in tg.graph.nodes:
        if n.op == "placeholder" and n.name in tg.state_keys:
            readers.setdefault(tg.state_keys[n.name], []).extend(u.name for u in n.users)
    for layer in layers:
        for key in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
            early = [r for r in readers.get(key, []) if r != layer.node and where[r] <= where[layer.node]] \
                if key else []
            if early:
                return f"{key} is read by {early[0]} before {layer.node}"
    return None


def _moments_of(values: list[torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = _Moments(dim)
    for t in values:
        m.add(t)
    return m.result()


def _repair_staged(tg: TracedGraph, state: dict, layers: list[Layer], batches: list[tuple], goal, mode: str,
                   eps: float, max_bytes: int | None) -> dict[str, torch.Tensor]:
    """`repair_state` in one pass over the data (layers in graph order): every batch advances
    through the graph together, stopping at each measured node to correct its layer."""
    run = StagedRun(tg, state, batches, max_bytes)
    try:
        for layer in progress(layers, desc="REPAIR layers"):
            mean, std = _moments_of(run.advance_to(layer.node), layer.channel_dim)
            for key, value in _corrected(layer, state, mean, std, goal, mode, eps).items():
                state[key] = value
                run.set_state(key, value)
            if layer.kind == "dense":
                run.rerun(layer.node)
    finally:
        run.close()
    return state


def repair_state(tg: TracedGraph, state: dict[str, torch.Tensor], layers: list[Layer], data: Iterable,
                 goal: dict[str, tuple[torch.Tensor, torch.Tensor]], *, mode: str = "repair",
                 eps: float = 1e-8, n_inputs: int = 1, max_bytes: int | None = STAGED_BYTES) -> dict[str, torch.Tensor]:
    """A new state dict with each layer corrected in turn, in graph order (see the module
    docstring); ``n_inputs``: how many tensors of each batch are the forward's inputs.

    All batches go through the graph together, once, stopping at each layer
    (`autoperm.merge.staged.StagedRun`). Where the values held at some node over all of
    ``data`` would exceed ``max_bytes`` (``None``: no limit; 0: never try), memory runs out, or
    a corrected tensor is also read before its layer (tied weights), each layer is measured
    with a pass of its own over ``data`` instead: the same result, more time, the memory of
    one batch."""
    data = list(data)
    batches = [stat_inputs(b, n_inputs, "normalization statistics") for b in data]
    check_samples(sum(x[0].shape[0] for x in batches), "normalization statistics")
    layers = _in_graph_order(tg, layers)
    why = "max_bytes=0" if max_bytes is not None and max_bytes <= 0 else _read_before(tg, layers)
    done, why = try_one_pass(lambda: _repair_staged(tg, dict(state), layers, batches, goal, mode, eps, max_bytes), why)
    if done is not None:
        return done
    log.info("REPAIR in one pass: %s; measuring each layer with a pass of its own over data", why)
    state = dict(state)
    for layer in progress(layers, desc="REPAIR layers, a pass each"):
        mean, std = channel_moments(tg, state, data, [layer], n_inputs)[layer.node]
        state.update(_corrected(layer, state, mean, std, goal, mode, eps))
    return state
