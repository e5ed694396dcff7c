"""Example inputs when the caller gives none: from ``example_inputs``, else the first batch of
``data``, else shaped like a traced graph's inputs (an alignment's, so a rewrite runs at the size
the models were traced at), else guessed from the model (timm's ``pretrained_cfg``, an emitted
module's placeholders, or the first conv / linear / embedding). Each guess is logged.

Example::

    resolve_inputs(nn.Linear(6, 3), None, None)     # (randn(2, 6),), logged
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from ._data import first_inputs
from .frontend import normalize_inputs

__all__ = ["resolve_inputs", "rewrite_graph", "input_count", "infer_example_inputs", "traced_inputs", "placeholder_inputs", "same_shapes"]

log = logging.getLogger(__name__)


def resolve_inputs(model: nn.Module, example_inputs: Any, data: Iterable | None, *, n_inputs: int = 1,
                   traced: Any = None) -> tuple[torch.Tensor, ...]:
    """The example inputs to use (module docstring); ``traced``: an alignment's `TracedGraph`."""
    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    if data is not None:
        got = first_inputs(data, n_inputs)
        if got is not None:
            log.info("example inputs taken from the first batch of data: %s", [tuple(t.shape) for t in got])
            return got
    got = traced_inputs(model, traced)
    if got is not None:
        return got
    got = infer_example_inputs(model)
    log.info("example inputs inferred from the model: %s", [tuple(t.shape) for t in got])
    return got


def rewrite_graph(model_a: nn.Module, alignment: Any, example_inputs: Any, data: Iterable | None,
                  traced: Any = None) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """The traced graph of ``model_a`` a rewrite (PFM, partial merging) builds on, and its inputs
    (`resolve_inputs`): ``traced`` when given; else the alignment's graph if it was traced at the
    inputs' shapes (`same_shapes`); else model_a traced anew at those inputs."""
    from .frontend import capture

    base = traced or getattr(alignment, "traced", None)
    inputs = resolve_inputs(model_a, example_inputs, data, traced=base,
                            n_inputs=input_count(alignment.spec, example_inputs, base))
    if traced is not None:
        return traced, inputs
    if base is None or not same_shapes(base, inputs):
        if base is not None:
            log.info("the alignment was traced at other input shapes than %s: tracing model_a again",
                     [tuple(t.shape) for t in inputs])
        base = capture(model_a, inputs)
    return base, inputs


def input_count(spec: Any, example_inputs: Any, traced: Any = None) -> int:
    """Tensors per batch that are the forward's inputs: from ``example_inputs``, else from
    ``traced`` (an alignment's `TracedGraph`), else from the spec (`autoperm.trace` records how
    many it was traced with), else 1."""
    if example_inputs is not None:
        return len(normalize_inputs(example_inputs))
    if traced is not None and getattr(traced, "user_inputs", None):
        return len(traced.user_inputs)
    n = spec.meta.get("inputs", 1) if spec is not None else 1
    return n if isinstance(n, int) and n >= 1 else 1


def same_shapes(traced: Any, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``inputs`` have the shapes ``traced``'s user inputs were traced at, symbolic sizes
    aside, and the batch size too unless the graph has a dynamic batch (True when the graph
    records no shapes)."""
    vals = [n.meta.get("val") for n in traced.graph.nodes if n.op == "placeholder" and n.name in
            set(traced.user_inputs)]
    if len(vals) != len(inputs) or not all(isinstance(v, torch.Tensor) for v in vals):
        return len(vals) == len(inputs) or not vals
    for v, x in zip(vals, inputs):
        if not isinstance(x, torch.Tensor) or v.dim() != x.dim():
            return False
        first = 1 if getattr(traced, "dynamic_batch", True) else 0
        if any(isinstance(s, int) and s != t for s, t in zip(v.shape[first:], x.shape[first:])):
            return False
    return True


def infer_example_inputs(model: nn.Module) -> tuple[torch.Tensor]:
    """Example inputs guessed from timm's ``pretrained_cfg`` or the first conv / linear / embedding."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    kw = {"dtype": p.dtype, "device": p.device} if p is not None else {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return (torch.randn(2, *cfg["input_size"], **kw),)
    got = placeholder_inputs(model.graph, None, kw.get("device")) if isinstance(model, torch.fx.GraphModule) else None
    if got is not None:  # an emitted module keeps its placeholders' shapes until it is pickled
        return got
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (torch.randn(2, m.in_features, **kw),)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)]
            return (torch.randn(2, m.in_channels, *([32] * nd), **kw),)
        if isinstance(m, nn.Embedding):
            return (torch.randint(0, m.num_embeddings, (2, 16), device=m.weight.device),)
    raise ValueError(f"cannot guess example inputs for {type(model).__name__}: pass example_inputs=")


def traced_inputs(model: nn.Module, traced) -> tuple[torch.Tensor, ...] | None:
    """Inputs shaped like the user inputs of ``traced`` (an alignment's `TracedGraph` of model_a;
    None when there is none), on model's device: the size the graph was traced at."""
    if traced is None:
        return None
    p = next((t for t in model.parameters()), None)
    got = placeholder_inputs(traced.graph, set(traced.user_inputs), p.device if p is not None else None)
    if got is not None:
        log.info("example inputs shaped like the traced graph's: %s", [tuple(t.shape) for t in got])
    return got


def placeholder_inputs(graph: torch.fx.Graph, names: set[str] | None, device=None) -> tuple[torch.Tensor, ...] | None:
    """Random tensors shaped like the placeholders of ``graph`` (those in ``names``, else all),
    batch 2 for symbolic sizes; None if one has no recorded value."""
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder" and (names is None or n.name in names)]
    if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    out = []
    for v in vals:
        shape = [s if isinstance(s, int) else 2 for s in v.shape]
        out.append(torch.randn(shape, dtype=v.dtype, device=device) if v.is_floating_point()
                   else torch.zeros(shape, dtype=v.dtype, device=device))  # ids / masks: zeros are valid
    return tuple(out)
