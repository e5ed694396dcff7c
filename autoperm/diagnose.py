"""Diagnostics of the vanishing feature, and post-pruning normalization (the Vanishing Feature
paper, ../papers/003: variance collapse and the vanishing feature, sections 3.3 and 4.1; post-
pruning REPAIR, section 4.5).

`diagnose(merged, endpoints, data)` measures, for every conv / linear layer of the traced graph
(topological order, never module names), two ratios of the merged model against the mean of
the endpoints (the models that were merged):

* the **variance ratio**: per output channel, the variance of the layer's output (its
  pre-activation: the conv / linear node, or the BatchNorm right after it, which is part of
  the layer; before any nonlinearity) over the mean of the endpoints' variances, averaged over
  channels. Variance collapse (section 3.3,
  REPAIR) shows as a ratio well below 1 that shrinks with depth;
* the **vanishing-feature ratio**: ``E_x ||f(x) - f(0)||`` (Definition 4.1: ``f`` the layer's
  output for one sample, ``0`` an all-zero input, the norm over all of one sample's values) over
  the endpoints' mean. Near 0 means the layer's output hardly depends on the input any more.

`repair(pruned, reference, data)` is the post-pruning normalization of section 4.5: the pruned
model's conv / linear layers get the reference model's per-channel pre-activation mean and std
(REPAIR), folded into their weights and biases by `autoperm.merge.repair`; layers that feed a
BatchNorm are left alone and that BatchNorm's running statistics are recomputed (RESET).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import torch
from torch import nn

from ._copy import copy_with_state
from ._data import first_inputs, stat_inputs
from ._progress import progress
from ._stats import run_graph
from .errors import ExampleInputError
from .frontend import TracedGraph, capture, normalize_inputs
from .merge.bias import count_layers
from .merge.repair import _BN, Layer, _packet, channel_moments, find_layers, repair_state

__all__ = ["diagnose", "Diagnosis", "DiagnosisRow", "repair", "REPAIR_MODES"]

log = logging.getLogger(__name__)
REPAIR_MODES = ("repair", "rescale", "reset")
_CHANNEL_DIM = {"linear": -1}  # conv*: 1


class DiagnosisRow(NamedTuple):
    """One counted conv / linear layer. ``layer`` is its weight's state_dict key without
    ``.weight`` (``#k`` appended for the k-th call of a layer used several times), ``node`` the
    traced graph's node measured (the conv / linear, or the BatchNorm that follows it);
    ``feature_norm`` is the merged model's ``E||f(x) - f(0)||`` and ``endpoint_feature_norm``
    the endpoints' mean of it."""

    layer: str
    variance_ratio: float
    vanishing_ratio: float
    node: str
    feature_norm: float
    endpoint_feature_norm: float


@dataclass(frozen=True)
class Diagnosis:
    """The result of `diagnose`: one `DiagnosisRow` per counted layer, in topological order."""

    rows: list[DiagnosisRow]

    def table(self) -> str:
        """A printable text table: layer count, layer, variance ratio, vanishing-feature ratio."""
        width = max([len("layer")] + [len(r.layer) for r in self.rows])
        lines = [f"{'#':>3}  {'layer':<{width}}  {'var ratio':>9}  {'vanish ratio':>12}",
                 f"{'-' * 3}  {'-' * width}  {'-' * 9}  {'-' * 12}"]
        for i, r in enumerate(self.rows, 1):
            lines.append(f"{i:>3}  {r.layer:<{width}}  {r.variance_ratio:>9.3f}  {r.vanishing_ratio:>12.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path) -> Path:
        """Both ratios against the layer count, as a PNG / SVG (by ``path``'s extension) drawn
        with matplotlib (``pip install "autoperm[viz]"``); written atomically. Returns ``path``."""
        from .viz_render import pyplot, write_atomic

        plt = pyplot()
        path = Path(path)
        counts = list(range(1, len(self.rows) + 1))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(counts, [r.variance_ratio for r in self.rows], marker="o", label="variance ratio")
        ax.plot(counts, [r.vanishing_ratio for r in self.rows], marker="s",
                label="vanishing-feature ratio E||f(x) - f(0)||")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        if len(counts) <= 30:
            ax.set_xticks(counts)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("counted conv / linear layer")
        ax.set_ylabel("merged / mean of endpoints")
        ax.legend()
        fig.tight_layout()
        try:
            write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
        finally:
            plt.close(fig)
        return path


def check_same_tensors(model: nn.Module, others: Sequence[nn.Module], what: str = "endpoints",
                       base: str = "merged", indexed: bool = True) -> None:
    """Raise ``ValueError`` naming the first tensor whose key or shape differs between ``model``
    and one of ``others``. ``what`` and ``base`` name the arguments in the message
    (``what[i]`` when ``indexed``)."""
    ref = model.state_dict()
    for i, other in enumerate(others):
        name = f"{what}[{i}]" if indexed else what
        sd = other.state_dict()
        for key in list(ref) + [k for k in sd if k not in ref]:
            if key not in sd or key not in ref:
                raise ValueError(f"{name} does not have the same tensors as {base}: {key!r} is missing from "
                                 f"{name if key not in sd else base}; all models must have the same state_dict "
                                 "keys and shapes")
            a, b = ref[key], sd[key]
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
                raise ValueError(f"{name} does not have the same tensors as {base}: {key!r} has shape "
                                 f"{tuple(b.shape)}, expected {tuple(a.shape)}")


def _as_models(models: Any, name: str) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)) or not models:
        raise TypeError(f"{name} must be a non-empty list or tuple of nn.Module (the models that were merged), "
                        f"got {type(models).__name__}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name}[{i}] must be an nn.Module, got {type(m).__name__}")
    return list(models)


def _prepare(model: nn.Module, name: str, data: Any,
             example_inputs: Any) -> tuple[list, tuple[torch.Tensor, ...], int]:
    """``data`` as a list, the inputs to trace with, and the number of inputs per batch."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
    if data is None or isinstance(data, torch.Tensor):
        raise TypeError("data must be an iterable of batches (a list of input tensors, or of (input, target) "
                        "tuples, or a DataLoader), got " + ("None" if data is None else "a bare Tensor: wrap it "
                                                            "in a list, data=[x]"))
    data = list(data)
    if not data:
        raise ValueError("data has no batches: pass at least one batch of inputs")
    n_inputs = 1 if example_inputs is None else len(normalize_inputs(example_inputs))
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else first_inputs(data, n_inputs)
    return data, inputs, n_inputs


def _capture(model: nn.Module, name: str, inputs: tuple[torch.Tensor, ...], example_inputs: Any) -> TracedGraph:
    """`capture`; when the inputs are the first batch of data, an ExampleInputError that says so."""
    try:
        return capture(model, inputs)
    except ExampleInputError as e:
        if example_inputs is not None:
            raise
        cause = e.__cause__
        detail = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}" if cause else str(e)
        raise ExampleInputError(
            f"{name} raised when called on the first batch of data= (input shapes "
            f"{[tuple(t.shape) for t in inputs]}): {detail}. Pass data= whose batches {name}'s forward accepts "
            "(a Tensor, or a tuple whose first item is the input), or example_inputs=") from (cause or e)


def _bad_batch(e: Exception, where: str, x: tuple[torch.Tensor, ...] | None = None) -> ExampleInputError:
    """An ExampleInputError for a graph that raised on a batch of ``data`` (``where``: which one)."""
    shapes = f" (input shapes {[tuple(t.shape) for t in x]})" if x is not None else ""
    first = (str(e).strip().splitlines() or [""])[0]
    return ExampleInputError(f"the model raised on {where}{shapes}: {type(e).__name__}: {first}. Every batch of "
                             "data= must hold inputs the forward accepts, like the first batch")


def _measured(tg: TracedGraph, node_name: str) -> tuple[str, int]:
    """Where a conv / linear layer's output is measured, and its channel dim: the node itself,
    or the output of the BatchNorm that is its only user (a conv and its BatchNorm are one layer)."""
    node = next(n for n in tg.graph.nodes if n.name == node_name)
    dim = _CHANNEL_DIM.get(_packet(node), 1)
    users = list(node.users)
    if dim == 1 and len(users) == 1 and _packet(users[0]) in _BN and users[0].args[0] is node:
        bn = users[0]
        if _packet(bn) == "batch_norm":  # returns the tensor itself
            return bn.name, dim
        first = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
        if len(first) == 1:
            return first[0].name, dim
    return node.name, dim


def _layer_names(weights: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for w in weights:
        base = w[: -len(".weight")] if w.endswith(".weight") else w
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


@torch.no_grad()
def _feature_stats(tg: TracedGraph, state, data: list, dims: dict[str, int], n_inputs: int):
    """Per node: (per-channel variance, ``E||f(x) - f(0)||``) over ``data``, in float64."""
    acc = {n: [0, 0.0, 0.0, 0, 0.0] for n in dims}  # rows, sum, sum of squares, samples, sum of norms
    zeros: dict[tuple, dict[str, torch.Tensor]] = {}
    for i, batch in enumerate(progress(data, desc="feature statistics")):
        x = stat_inputs(batch, n_inputs, "diagnose")
        shapes = tuple(tuple(t.shape) for t in x)
        try:
            out = run_graph(tg, state, x, set(dims))
            if shapes not in zeros:
                zeros[shapes] = run_graph(tg, state, tuple(torch.zeros_like(t) for t in x), set(dims))
        except RuntimeError as e:
            raise _bad_batch(e, f"batch {i} of data=", x) from e
        for node, t in out.items():
            f = t.movedim(dims[node], -1).reshape(-1, t.shape[dims[node]]).double()
            a = acc[node]
            a[0] += f.shape[0]
            a[1] = a[1] + f.sum(0)
            a[2] = a[2] + (f * f).sum(0)
            a[3] += t.shape[0]
            a[4] += (t.double() - zeros[shapes][node].double()).flatten(1).norm(dim=1).sum().item()
    out = {}
    for node, (n, s, sq, samples, norms) in acc.items():
        mean = s / n
        out[node] = ((sq / n - mean * mean).clamp_min(0), norms / samples)
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def diagnose(merged: nn.Module, endpoints: Sequence[nn.Module], data: Iterable, *,
             example_inputs: Any = None) -> Diagnosis:
    """Variance ratio and vanishing-feature ratio of ``merged`` against ``endpoints`` (the models
    merged, usually two), per conv / linear layer of the traced graph in topological order.

    All models must have the same state_dict keys and shapes (else ``ValueError`` naming the
    first mismatching tensor); a PFM or partial merge (another architecture) cannot be
    diagnosed this way. A conv / linear whose only user is a BatchNorm is measured after that
    BatchNorm. ``f(0)`` zeroes every input tensor. ``data`` is an iterable of batches (a
    Tensor, or a tuple whose first item is the input); ``example_inputs`` default to the first
    batch's inputs. The models run as ``merged``'s traced graph in eval mode; none is modified.

    Example (the Vanishing Feature paper, sections 3.3 and 4.1: a naive average of two models
    shows variance collapse and vanishing features, REPAIR restores the variance)::

        naive = autoperm.merge(a, b, method="identity")
        d = autoperm.diagnose(naive, [a, b], [x_batch])
        print(d.table())          # variance ratio ~0.5, 0.25, ... on random-init MLPs
        d.plot("diagnosis.png")   # needs matplotlib: pip install "autoperm[viz]"
    """
    data, inputs, n_inputs = _prepare(merged, "merged", data, example_inputs)
    endpoints = _as_models(endpoints, "endpoints")
    check_same_tensors(merged, endpoints)
    tg = _capture(merged, "merged", inputs, example_inputs)
    counted = count_layers(tg)
    if not counted:
        raise ValueError(f"{type(merged).__name__} has no conv / linear layer in its traced graph: nothing to diagnose")
    where = [_measured(tg, c.node) for c in counted]
    dims = dict(where)
    stats = [_feature_stats(tg, m.state_dict(), data, dims, n_inputs) for m in [merged, *endpoints]]
    rows = []
    for (node, _), name in zip(where, _layer_names([c.weight for c in counted])):
        var_m, norm_m = stats[0][node]
        var_e = sum(s[node][0] for s in stats[1:]) / len(endpoints)
        norm_e = sum(s[node][1] for s in stats[1:]) / len(endpoints)
        live = var_e > 1e-12 * max(var_e.max().item(), 1e-30)
        var_ratio = (var_m[live] / var_e[live]).mean().item() if live.any() else float("nan")
        rows.append(DiagnosisRow(name, var_ratio, _ratio(norm_m, norm_e), node, norm_m, norm_e))
    log.info("diagnosed %d layers over %d batches", len(rows), len(data))
    return Diagnosis(rows)


def repair(pruned: nn.Module, reference: nn.Module, data: Iterable, *, mode: str = "repair",
           example_inputs: Any = None) -> nn.Module:
    """Post-pruning normalization (the Vanishing Feature paper, section 4.5): a new model whose
    conv / linear layers' per-channel pre-activation mean and std, measured on ``data``, are
    those of ``reference`` (the model before pruning), folded into each layer's weight and bias.

    ``pruned`` and ``reference`` must have the same state_dict keys and shapes (pruning here
    means zeroed weights). Layers are corrected in graph order, each measured after the
    corrections before it (`autoperm.merge.repair.repair_state`), so the statistics match on
    ``data``. A layer that feeds a BatchNorm is left alone and that BatchNorm's running
    statistics are recomputed on ``data`` instead (RESET). ``mode``: ``"repair"`` (mean and
    std), ``"rescale"`` (std only, biases scaled) or ``"reset"`` (BatchNorms only). A layer
    without a bias gets its std but not its mean (logged). Neither input is modified.

    Example (section 4.5: one-shot magnitude pruning at high sparsity, then REPAIR)::

        pruned = magnitude_prune(model, 0.7)               # a copy with 70% of weights zeroed
        fixed = autoperm.repair(pruned, model, calibration_batches)
    """
    if mode not in REPAIR_MODES:
        raise ValueError(f"mode={mode!r} is not available; choose one of {list(REPAIR_MODES)}")
    data, inputs, _ = _prepare(pruned, "pruned", data, example_inputs)
    if len(inputs) != 1:  # repair_state reads one input per batch
        raise ValueError(f"repair supports models with one input; example_inputs has {len(inputs)}")
    if not isinstance(reference, nn.Module):
        raise TypeError(f"reference must be an nn.Module (the unpruned model), got {type(reference).__name__}")
    check_same_tensors(pruned, [reference], what="reference", base="pruned", indexed=False)
    tg = _capture(pruned, "pruned", inputs, example_inputs)
    dense = set() if mode == "reset" else {c.weight for c in count_layers(tg)}
    layers: list[Layer] = find_layers(tg, dense)
    dense_layers = [layer for layer in layers if layer.kind == "dense"]
    try:
        goal = channel_moments(tg, reference.state_dict(), data, dense_layers) if dense_layers else {}
        state = repair_state(tg, pruned.state_dict(), layers, data, goal,
                             mode="rescale" if mode == "rescale" else "repair")
    except RuntimeError as e:
        raise _bad_batch(e, "a batch of data=") from e
    log.info("%s: %d conv / linear layers, %d BatchNorm layers", mode, len(dense_layers),
             len(layers) - len(dense_layers))
    return copy_with_state(pruned, state)
