"""Data flow between layers, recorded in one eager forward pass (used by `autoperm.viz.layer_graph`).

A *layer* is the module whose parameters or buffers an op reads (``layer1.0.conv1``; a tensor owned
by the root module is its own layer, ``cls_token``). A ``TorchFunctionMode`` follows every tensor
from the op that made it: ops without parameters pass their inputs' layers through, and where
several branches meet (a residual add, a concatenation) a junction node records the meeting.

Example::

    flow = layer_flow(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4))
    flow.edges  # [("input", "0"), ("0", "2"), ("2", "output")]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Flow", "layer_flow", "layer_of"]

@dataclass
class Flow:
    """Data flow between layers: ``layers`` in order of first use, ``edges`` (producer, consumer);
    ``"input"`` and ``"output"`` stand for the model's inputs and outputs, ``"op:+#7"`` for a
    junction (an op without parameters where several branches meet, a residual add, a concat)."""

    layers: list[str] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


_JUNCTIONS = {"add": "+", "iadd": "+", "add_": "+", "sub": "-", "mul": "*", "imul": "*", "mul_": "*"}


def layer_of(names: Sequence[str]) -> str:
    """The layer a set of tensors belongs to: their common module path (a root tensor: its name)."""
    paths = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common) or names[0]


def layer_flow(model: "nn.Module", example_inputs: Any) -> Flow:
    """Record which layer feeds which in one eager forward pass of a copy of ``model`` (eval mode,
    no grad; the model itself is untouched). A *layer* is the module whose parameters or buffers
    an op reads; ops without any (activations, adds, reshapes) pass their inputs' layers through,
    so a residual add makes both branches feed the next layer.

    Example::

        flow = layer_flow(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4))
        flow.edges  # [("input", "0"), ("0", "2"), ("2", "output")]
    """
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    from ._copy import copy_module
    from .frontend import normalize_inputs

    inputs = normalize_inputs(example_inputs)
    work = copy_module(model).eval()
    named = {id(t): n for n, t in list(work.named_buffers()) + list(work.named_parameters())}
    source: dict[int, frozenset[str]] = {id(t): frozenset(["input"]) for t in inputs}
    keep: list[Any] = []  # holds every tensor seen, so ids are not reused during the pass
    flow, edges = Flow(), {}

    def sources(obj: Any) -> set[str]:
        found: set[str] = set()
        for t in tree_leaves(obj):
            if isinstance(t, torch.Tensor) and id(t) not in named:
                found |= source.get(id(t), frozenset())
        return found

    class _Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if not outs:
                return out
            params = [named[id(t)] for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                      and id(t) in named]
            ins = sources((args, kwargs))
            layer = layer_of(params) if params else None
            if layer is None:  # several branches meet (a residual add, a concatenation): a junction
                branches = {source[id(t)] for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                            and id(t) not in named and source.get(id(t))}
                if len(branches) > 1:
                    name = getattr(func, "__name__", "op").strip("_")
                    layer = f"op:{_JUNCTIONS.get(name, name)}#{len(flow.layers)}"
            if layer is not None:
                if layer not in flow.layers:
                    flow.layers.append(layer)
                edges.update({(s, layer): None for s in ins if s != layer})
                ins = {layer}
            for t in outs:
                if id(t) not in named:
                    source[id(t)] = frozenset(ins)
            keep.append(out)
            return out

    with torch.no_grad(), _Recorder():
        result = work(*inputs)
    edges.update({(s, "output"): None for s in sources(result)})
    flow.edges = list(edges)
    return flow
