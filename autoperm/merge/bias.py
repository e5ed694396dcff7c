"""Bias calibration and bias removal: two data-free remedies for the vanishing feature (the
Vanishing Feature paper, ../papers/003, section 4.3 "Bias Removal" / "Bias Calibration",
Appendix A.3 "Normalization Details" and A.6.1 "Forward Bias Removal").

After merging, input-induced features shrink layer after layer while the input-independent
offsets made of biases decay more slowly, so deep layers are dominated by the biases.

* **Bias calibration** scales the biases by depth (homogeneous interpolation, Wang et al.):
  the bias of the l-th counted layer becomes ``(1 - alpha)^l * b_A + alpha^l * b_B``; with
  ``n`` models of weights ``w_i`` (`autoperm.merge_many`), ``sum_i w_i^l * b_i``.
* **Bias removal** sets the biases of the last ``k`` counted layers to zero (all of them with
  ``k=None``, the paper's baseline; A.6.1 finds removing the last 5 of VGG16's best).

**Counting layers.** The counted layers are the conv / linear nodes of the traced ATen graph
(never module names), and a layer's count ``l`` is its depth: the number of conv / linear
layers on the longest path from the model's input to it, itself included. On a chain this is
the topological count 1, 2, ..., L; parallel branches (a ResNet shortcut projection, inception
branches) share the count of their level. "The last k layers" are those with ``l > L - k``. A
bias used at two depths (a module called twice) keeps its interpolated value under calibration
(logged) and counts at its deepest use under removal. BatchNorm shifts are not biases here.

Example (an MLP with 3 linear layers, counts 1, 2, 3)::

    merged = autoperm.merge(a, b, normalize="bias_calibration")   # b_l = 0.5^l (b_A + b_B)
    merged = autoperm.merge(a, b, normalize="bias_removal", bias_layers=1)   # last bias = 0
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

import torch

from ..frontend import TracedGraph
from .repair import _packet

__all__ = ["CountedLayer", "count_layers", "calibrate_biases", "remove_biases"]

log = logging.getLogger(__name__)

# conv / linear ops with a weight (also `autoperm.rewrite.pfm`'s counted layers)
DENSE_OPS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
                       "conv_transpose2d", "conv_transpose3d"})


@dataclass(frozen=True)
class CountedLayer:
    """A conv / linear node, its weight and bias keys, and its depth count (1 = first)."""

    node: str
    weight: str
    bias: str | None
    depth: int


def weight_key(tg: TracedGraph, node) -> str | None:
    """The state_dict key behind the weight (second argument) of a conv / linear node: the
    weight itself, or, for a weight computed from parameters alone (``weight_norm``'s
    ``g * v / |v|``), the first of them by name; None for a weight that depends on the input or
    on a tensor without a key. The caller checks the op's kind."""
    if len(node.args) < 2 or not hasattr(node.args[1], "op"):
        return None
    seen, todo = set(), [node.args[1]]
    keys = []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n.name not in tg.state_keys:
                return None   # an input, or a tensor without a key: not a layer's own weight
            keys.append(tg.state_keys[n.name])
        elif n.op == "call_function":
            todo += n.all_input_nodes
    return sorted(keys)[0] if keys else None


def count_layers(tg: TracedGraph, preserved: Collection[str] = ()) -> list[CountedLayer]:
    """The conv / linear layers of the graph in topological order, each with its depth count.

    ``preserved`` (node names; Preserve-First Merging) are the nodes left unmerged: they are not
    listed, and one that is a conv / linear layer or reads one counts as depth 1 for what reads it,
    since the merge node that averages the two models' preserved outputs is one merging step, like
    a merged first layer (a preserved op on the raw input alone, a flatten say, stays depth 0: both
    models compute the same value there). With nothing preserved this is the plain count; the
    merged layers of PFM count from the merge boundary.
    """
    depth: dict[str, int] = {}
    layers = []
    for node in tg.graph.nodes:
        d = max((depth.get(n.name, 0) for n in node.all_input_nodes), default=0)
        args = node.args
        weight = weight_key(tg, node) if _packet(node) in DENSE_OPS else None
        dense = weight is not None
        if node.name in preserved:
            depth[node.name] = 1 if dense or d else 0
            continue
        if dense:
            d += 1
            bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
            layers.append(CountedLayer(node.name, weight, tg.state_keys.get(getattr(bias, "name", None)), d))
        depth[node.name] = d
    return layers


def _bias_depths(layers: Sequence[CountedLayer]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for layer in layers:
        if layer.bias is not None:
            out.setdefault(layer.bias, set()).add(layer.depth)
    return out


def calibrate_biases(state: Mapping[str, torch.Tensor], sources: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float], layers: Sequence[CountedLayer]) -> dict[str, torch.Tensor]:
    """A new ``state`` whose counted biases are ``sum_i weights[i]^l * sources[i][bias]``.

    ``sources`` are the aligned state dicts that were interpolated with ``weights`` into ``state``.
    """
    out = dict(state)
    scaled = 0
    for key, depths in _bias_depths(layers).items():
        if len(depths) > 1:
            log.info("bias %s is used at depths %s: bias calibration left it interpolated", key, sorted(depths))
            continue
        (l,) = depths
        acc = sum(float(w) ** l * s[key].double() for w, s in zip(weights, sources))
        out[key] = acc.to(state[key].dtype)
        scaled += 1
    log.info("bias calibration: %d biases scaled by depth", scaled)
    return out


def remove_biases(state: Mapping[str, torch.Tensor], layers: Sequence[CountedLayer],
                  last: int | None = None) -> dict[str, torch.Tensor]:
    """A new ``state`` with the biases of the last ``last`` counted layers (all with ``None``) zeroed."""
    if not layers:
        raise ValueError("normalize='bias_removal' found no conv / linear layer in the traced graph")
    total = max(layer.depth for layer in layers)
    if last is not None and (isinstance(last, bool) or not isinstance(last, numbers.Integral) or not 1 <= last <= total):
        raise ValueError(f"bias_layers={last!r}: pass an integer from 1 to {total} (the model has {total} "
                         "conv / linear layers on its longest path, the depth bias_removal counts), or None to "
                         "remove every bias")
    k = total if last is None else int(last)
    out = dict(state)
    zeroed = []
    for key, depths in _bias_depths(layers).items():
        if max(depths) > total - k:
            out[key] = torch.zeros_like(state[key])
            zeroed.append(key)
    log.info("bias removal: zeroed %d biases of the last %d of %d counted layers: %s", len(zeroed), k, total, zeroed)
    return out
