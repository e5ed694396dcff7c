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
result is exact on the data; no module is added.
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


def channel_moments(tg: TracedGraph, state, data: Iterable, layers: list[Layer],
                    n_inputs: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std (float64, population) at each layer's node over ``data``."""
    sums: dict[str, list] = {}
    wanted = {l.node for l in layers}
    dims = {l.node: l.channel_dim for l in layers}
    samples = 0
    for batch in progress(data, desc="channel statistics"):
        x = stat_inputs(batch, n_inputs, "normalization statistics")
        samples += x[0].shape[0]
        out = run_graph(tg, state, x, wanted)
        for node, t in out.items():
            f = t.movedim(dims[node], -1).reshape(-1, t.shape[dims[node]]).double()
            acc = sums.setdefault(node, [0, 0.0, 0.0])
            acc[0] += f.shape[0]
            acc[1] = acc[1] + f.sum(0)
            acc[2] = acc[2] + (f * f).sum(0)
    check_samples(samples, "normalization statistics")
    out = {}
    for node, (n, s, sq) in sums.items():
        mean = s / n
        out[node] = (mean, (sq / n - mean * mean).clamp_min(0).sqrt())
    return out


def repair_state(tg: TracedGraph, state: dict[str, torch.Tensor], layers: list[Layer], data: Iterable,
                 goal: dict[str, tuple[torch.Tensor, torch.Tensor]], *, mode: str = "repair",
                 eps: float = 1e-8, n_inputs: int = 1) -> dict[str, torch.Tensor]:
    """A new state dict with each layer corrected in turn (see the module docstring);
    ``n_inputs``: how many tensors of each batch are the forward's inputs."""
    data = list(data)
    state = dict(state)
    for layer in layers:
        mean, std = channel_moments(tg, state, data, [layer], n_inputs)[layer.node]
        if layer.kind == "batchnorm":
            rm = state[layer.running_mean]
            state[layer.running_mean] = mean.to(rm.dtype)
            state[layer.running_var] = (std * std).to(rm.dtype)
            continue
        g_mean, g_std = goal[layer.node]
        scale = g_std / (std + eps)
        w = state[layer.weight]
        state[layer.weight] = w * scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))
        if layer.bias is not None:
            b = state[layer.bias]
            shifted = (b.double() - mean) * scale + g_mean if mode == "repair" else b.double() * scale
            state[layer.bias] = shifted.to(b.dtype)
        elif mode == "repair":
            log.info("layer %s has no bias: REPAIR rescaled it without shifting the mean", layer.weight)
    return state
