"""Regression normalization: each merged conv / linear layer refit, in graph order, so that its
output on the merged model's own inputs comes as close as it can (least squares over ``data``)
to the interpolation of the endpoints' outputs at that layer.

REPAIR (Jordan et al.; the Vanishing Feature paper, ../papers/003, Equation 1 and Appendix A.3)
corrects two numbers per channel: the merged layer's pre-activation mean and std are set to the
interpolation of the endpoints'. This module fits the whole affine map instead: with ``X`` the
layer's input in the merged model (after the layers before it were refit), ``Z_i`` that layer's
output in endpoint i (each endpoint run whole on the same batch) and ``w_i`` the merge weights
(``1 - alpha`` and ``alpha`` for two models), the layer's weight and bias become::

    argmin_W  sum_data || X W^T - sum_i w_i Z_i ||^2  +  ridge * mean(diag(X^T X)) * || W - W_merged ||^2

(the bias is a column of ``W`` against a column of ones in ``X``), solved in float64 from the
streamed moments ``X^T X`` and ``X^T Z_i``. The penalty pulls the answer toward the interpolated
weights, so a layer the data says little about keeps them; ``ridge -> inf`` is the plain merge.
This is the full-matrix counterpart of REPAIR's per-channel correction, and a sequential
relative of RegMean (Jin et al. 2023, named in the Partial Model Merging thesis, ../papers/004,
section 2.1), which solves ``sum_i X_i^T X_i W^T = sum_i X_i^T X_i W_i^T`` from each model's own
inputs instead of the merged model's.

A layer that feeds a BatchNorm (eval) is fit through it: the goal is the interpolation of the
endpoints' BatchNorm outputs, and the merged BatchNorm's affine map ``s z + c`` (its interpolated
statistics) is inverted into a goal for the layer; residuals count in the BatchNorm's output (so
output channel o's ridge is ``ridge * mean(s^2) / s_o^2``, rounded down to a power of 4 so that a
few factorizations serve all channels; a channel whose ridge would pass ``4^10`` times the
layer's, one the BatchNorm nearly zeroes, keeps its merged weights instead of growing without
bound); a layer
without a bias gets the fitted intercept in the BatchNorm's running mean. A BatchNorm whose
tensors another node also reads (a module called twice) is not fit through. A conv / linear layer without a bias that feeds no
BatchNorm is fit without an intercept. Tied weights (one tensor read by two layers), transposed
and 3-D convolutions, convolutions of an unbatched input and ``padding="same"`` with an even
kernel are left as merged, and logged. Each endpoint runs with its own keyless constants
(non-persistent buffers), which the caller passes in its graph.
No module is added and the architecture is unchanged.

Example::

    merged = autoperm.merge(model_a, model_b, method="activation", data=loader, normalize="regression")
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .._data import check_samples, stat_inputs
from .._progress import progress
from .._stats import run_graph
from ..frontend import TracedGraph
from ..rules.base import packet_name as _packet
from .staged import STAGED_BYTES, StagedRun, try_one_pass

__all__ = ["FitLayer", "find_fit_layers", "regression_state", "check_ridge", "DEFAULT_RIDGE"]

log = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-2
_BN_NT = "_native_batch_norm_legit_no_training"   # (input, weight, bias, mean, var, momentum, eps)
_BN = "batch_norm"                                # (input, weight, bias, mean, var, training, momentum, eps, cudnn)
_ROWS = 1 << 22  # rows x columns of an unfolded chunk held at once
_MAX_POWER = 10  # through a BatchNorm: a channel whose ridge would be 4^10 x the layer's keeps its weights


@dataclass(frozen=True)
class FitLayer:
    """A conv / linear node to refit. ``target`` names the node (in the endpoints' graph) whose
    interpolated value is the goal: the layer's own output, or the output of the BatchNorm it feeds
    (``bn``: the merged state keys ``(weight, bias, running_mean, running_var)`` and ``eps``)."""

    node: str
    input: str
    target: str
    weight: str
    bias: str | None
    conv: tuple | None = None     # (stride, padding, dilation, groups) as 2-D tuples; None: linear
    bn: tuple | None = None


def _pair(v, n: int) -> tuple[int, ...]:
    """An int or a sequence (one item means every spatial dim) as ``n`` ints."""
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v) * (n if len(v) == 1 else 1)
    return (int(v),) * n


def check_ridge(ridge, normalize) -> None:
    """Raise naming ``ridge=`` unless it is None or a finite number > 0 given with regression."""
    if ridge is None:
        return
    if normalize != "regression":
        raise ValueError(f"ridge= is used only by normalize='regression' (got normalize={normalize!r}): "
                         "drop it or pass normalize='regression'")
    try:
        finite = 0 < float(ridge) < math.inf
    except (TypeError, ValueError, OverflowError):
        finite = False
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not finite:
        raise ValueError(f"ridge={ridge!r}: pass a finite number > 0 (the pull toward the interpolated weights, "
                         "relative to the layer's input scale; default 1e-2)")


def _conv_geometry(node: torch.fx.Node, weight_shape: Sequence[int]) -> tuple | str:
    """(stride, padding, dilation, groups) of a conv1d / conv2d node as 2-D tuples, or why not."""
    spatial = len(weight_shape) - 2
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    got = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
    stride, dilation = _pair(got["stride"], spatial), _pair(got["dilation"], spatial)
    padding = got["padding"]
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same" and all(d * (k - 1) % 2 == 0 for k, d in zip(weight_shape[2:], dilation)):
            padding = [d * (k - 1) // 2 for k, d in zip(weight_shape[2:], dilation)]
        else:
            return f"padding={padding!r} with this kernel is not a symmetric zero padding"
    padding = _pair(padding, spatial)
    if spatial == 1:
        return (1, *stride), (0, *padding), (1, *dilation), int(got["groups"])
    return stride, padding, dilation, int(got["groups"])


def _bn_after(node: torch.fx.Node, key: Mapping[str, str], readers: Mapping[str, int]) -> tuple[str, tuple] | None:
    """(target node, bn keys and eps) when ``node``'s only user is an eval BatchNorm with running
    statistics over dim 1 whose tensors no other node reads (a BatchNorm module called twice
    would have its running mean moved by both fits); else None."""
    users = list(node.users)
    if len(users) != 1 or users[0].args[0] is not node:
        return None
    val = node.meta.get("val")
    if _packet(node) == "linear" and not (isinstance(val, torch.Tensor) and val.dim() == 2):
        return None  # a BatchNorm over dim 1 of a (N, L, C) output does not scale the linear's units
    bn = users[0]
    name = _packet(bn)
    if name not in (_BN_NT, _BN) or len(bn.args) < 5:
        return None
    if name == _BN and bool(bn.args[5] if len(bn.args) > 5 else bn.kwargs.get("training", False)):
        return None
    keys = [key.get(getattr(a, "name", None)) if a is not None else None for a in bn.args[1:5]]
    if keys[2] is None or keys[3] is None or any(k is None and a is not None for k, a in zip(keys, bn.args[1:5])):
        return None  # no running statistics, or a weight / bias that is not a state tensor
    if any(readers.get(k, 0) > 1 for k in keys if k is not None):
        return None
    eps = float(bn.args[6] if name == _BN_NT else bn.args[7]) if len(bn.args) > (6 if name == _BN_NT else 7) \
        else 1e-5
    if name == _BN:
        return bn.name, (*keys, eps)
    outs = [u for u in bn.users if u.target.__name__ == "getitem" and u.args[1] == 0] \
        if all(getattr(u.target, "__name__", "") == "getitem" for u in bn.users) else []
    return (outs[0].name, (*keys, eps)) if len(outs) == 1 else None


def find_fit_layers(tg: TracedGraph, eligible: set[str] | None = None) -> list[FitLayer]:
    """conv1d / conv2d / linear nodes of ``tg`` whose weight is a state tensor (in ``eligible``,
    when given) read by that node alone, in graph order. Others are logged and skipped."""
    key = tg.state_keys
    readers: dict[str, int] = {}
    for n in tg.graph.nodes:
        if n.op == "placeholder" and n.name in key:
            readers[key[n.name]] = readers.get(key[n.name], 0) + len(n.users)
    out = []
    for node in tg.graph.nodes:
        name = _packet(node)
        if name not in ("linear", "conv1d", "conv2d", "conv3d", "convolution") or len(node.args) < 2:
            continue
        w = key.get(getattr(node.args[1], "name", None))
        if w is None or (eligible is not None and w not in eligible):
            continue
        b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        b = key.get(getattr(b_arg, "name", None)) if b_arg is not None else None
        if b_arg is not None and b is None:
            log.info("regression: %s left as merged (its bias is not a state tensor)", node.name)
            continue
        why = None
        if readers.get(w, 0) > 1 or (b is not None and readers.get(b, 0) > 1):
            why = "its weight is tied to another layer"
        elif name in ("conv3d", "convolution"):
            why = f"aten.{name} (3-D or transposed convolution) is not refit"
        conv = None
        x_val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if why is None and name != "linear" and not (isinstance(x_val, torch.Tensor)
                                                     and x_val.dim() == node.args[1].meta["val"].dim()):
            why = "its input has no batch dim"
        if why is None and name != "linear":
            shape = node.args[1].meta["val"].shape
            geo = _conv_geometry(node, shape)
            why, conv = (geo, None) if isinstance(geo, str) else (None, geo)
        if why:
            log.info("regression: %s (%s) left as merged: %s", node.name, w, why)
            continue
        target, bn = _bn_after(node, key, readers) or (node.name, None)
        out.append(FitLayer(node.name, node.args[0].name, target, w, b, conv, bn))
    return out


def _accumulate(layer: FitLayer, weight_shape, x: torch.Tensor, t: torch.Tensor, acc: dict) -> None:
    """Add ``X^T X`` and ``X^T T`` of one batch (input ``x``, goal ``t`` in the layer's output
    layout) to ``acc``, in chunks of samples so that an unfolded conv input stays small."""
    if layer.conv is None:
        xs, ts, groups = [x.reshape(-1, x.shape[-1])], [t.reshape(-1, t.shape[-1])], 1
    else:
        stride, padding, dilation, groups = layer.conv
        if x.dim() == 3:
            x, t = x.unsqueeze(2), t.unsqueeze(2)
        kernel = tuple(weight_shape[2:]) if len(weight_shape) == 4 else (1, weight_shape[2])
        per_sample = x.shape[1] * kernel[0] * kernel[1] * t.shape[2] * t.shape[3]
        step = max(1, _ROWS // max(per_sample, 1))
        xs, ts = [], []
        for i in range(0, x.shape[0], step):
            cols = F.unfold(x[i:i + step].double(), kernel, dilation=dilation, padding=padding, stride=stride)
            xs.append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
            ts.append(t[i:i + step].double().flatten(2).transpose(1, 2).reshape(-1, t.shape[1]))
    for xr, tr in zip(xs, ts):
        xr = xr.double().reshape(xr.shape[0], groups, -1)
        if layer.bias is not None or layer.bn is not None:
            xr = torch.cat([xr, xr.new_ones(xr.shape[0], groups, 1)], 2)
        tr = tr.double().reshape(tr.shape[0], groups, -1)
        acc["xx"] = acc.get("xx", 0) + torch.einsum("rgi,rgj->gij", xr, xr)
        acc["xt"] = acc.get("xt", 0) + torch.einsum("rgi,rgo->gio", xr, tr)


def _bn_affine(layer: FitLayer, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged BatchNorm's eval map ``y = s z + c`` per channel (float64)."""
    wk, bk, mk, vk, eps = layer.bn
    var, mean = state[vk].double(), state[mk].double()
    s = (state[wk].double() if wk else torch.ones_like(var)) / torch.sqrt(var + eps)
    c = (state[bk].double() if bk else torch.zeros_like(var)) - mean * s
    return s, c


def _channel_view(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-channel ``v`` shaped to broadcast over dim 1 of ``t`` (a BatchNorm's channels)."""
    return v.reshape(-1, *([1] * (t.dim() - 2)))


Mix = Callable[[FitLayer, list], torch.Tensor]  # (layer, endpoint values) -> goal values, per unit


def _goal(layer: FitLayer, values: list[torch.Tensor], weights: Sequence[float] | Mix, state) -> torch.Tensor:
    """The layer's goal output: ``sum_i w_i Z_i`` (or ``weights(layer, values)``), taken back
    through the merged BatchNorm."""
    t = weights(layer, values).double() if callable(weights) else sum(w * v.double() for w, v in zip(weights, values))
    if layer.bn is not None:
        s, c = _bn_affine(layer, state)
        safe = torch.where(s.abs() > 1e-12 * s.abs().max().clamp_min(1e-300), s, torch.ones_like(s))
        t = (t - _channel_view(c, t)) / _channel_view(safe, t)
    return t


def _solve(layer: FitLayer, acc: dict, state: dict, ridge: float) -> dict[str, torch.Tensor]:
    """The refit weight (and bias, or BatchNorm running mean) from the moments in ``acc``."""
    w = state[layer.weight]
    groups = layer.conv[3] if layer.conv is not None else 1
    out_ch = w.shape[0]
    w0 = w.double().reshape(groups, out_ch // groups, -1).transpose(1, 2)  # (g, columns, outputs)
    intercept = layer.bias is not None or layer.bn is not None
    if intercept:
        b0 = state[layer.bias].double() if layer.bias is not None else w.new_zeros(out_ch, dtype=torch.float64)
        w0 = torch.cat([w0, b0.reshape(groups, 1, -1)], 1)
    xx, xt = acc["xx"], acc["xt"]
    reg = ridge * xx.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # (g,)
    power = torch.zeros(w0.shape[0], w0.shape[2], dtype=torch.long, device=w0.device)
    live = torch.ones_like(power, dtype=torch.bool)
    if layer.bn is not None:  # residuals in the BatchNorm's output: output o weighs s_o^2, its ridge is
        s, _ = _bn_affine(layer, state)  # reg * mean(s^2) / s_o^2, rounded to a power of 4
        s2 = (s * s).reshape(groups, -1)
        ratio = s2.mean() / s2.clamp_min(1e-300)
        live = s2 * 4.0 ** _MAX_POWER > s2.mean()  # a channel the BatchNorm (nearly) zeroes keeps its weights
        power = torch.floor(torch.log(ratio.clamp(4.0 ** -_MAX_POWER, 4.0 ** _MAX_POWER)) / math.log(4)).long()
    sol = w0.clone()
    eye = torch.eye(xx.shape[-1], dtype=xx.dtype, device=xx.device)
    for p in torch.unique(power[live]).tolist():  # one factorization per distinct ridge
        r = reg[:, None, None] * 4.0 ** p
        chol, info = torch.linalg.cholesky_ex(xx + r * eye)
        rhs = xt + r * w0
        got = torch.cholesky_solve(rhs, chol) if not bool(info.any()) else torch.linalg.solve(xx + r * eye, rhs)
        sol = torch.where((live & (power == p))[:, None, :], got, sol)
    new_w = sol[:, :w0.shape[1] - intercept].transpose(1, 2).reshape(w.shape)
    got = {layer.weight: new_w.to(w.dtype)}
    if intercept:
        b = sol[:, -1].reshape(-1)
        if layer.bias is not None:
            got[layer.bias] = b.to(state[layer.bias].dtype)
        else:  # fold the intercept into the BatchNorm: s (z + b) + c == BN with running_mean - b
            mk = layer.bn[2]
            got[mk] = (state[mk].double() - b).to(state[mk].dtype)
    return got


def _monotone(tg: TracedGraph, endpoints, layers: list[FitLayer]) -> str | None:
    """Why one staged pass cannot serve ``layers`` (already in the merged graph's order): a goal
    node that comes before the previous layer's in an endpoint's graph; else None."""
    for g, _ in endpoints:
        where = {n.name: i for i, n in enumerate(g.graph.nodes)}
        at = [where[lay.target] for lay in layers]
        if any(b < a for a, b in zip(at, at[1:])):
            return "the goal nodes are not in graph order"
    return None


def _regress_staged(tg, state: dict, layers, batches, endpoints, weights, ridge, max_bytes) -> dict:
    """`regression_state` in one pass: the merged graph and every endpoint's advance over all
    batches together (`autoperm.merge.staged.StagedRun`), the merged one stopping at each layer."""
    share = None if max_bytes is None else max_bytes // (1 + len(endpoints))
    runs = [StagedRun(tg, state, batches, share)] + [StagedRun(g, s, batches, share) for g, s in endpoints]
    try:
        for layer in progress(layers, desc="regression layers"):
            runs[0].advance_to(layer.node)
            xs = runs[0].value(layer.input)
            goals = [r.advance_to(layer.target) for r in runs[1:]]
            acc: dict = {}
            for k, x in enumerate(xs):
                _accumulate(layer, state[layer.weight].shape, x,
                            _goal(layer, [z[k] for z in goals], weights, state), acc)
            for key, value in _solve(layer, acc, state, ridge).items():
                state[key] = value
                runs[0].set_state(key, value)
            runs[0].rerun(layer.node)
    finally:
        for r in runs:
            r.close()
    return state


def regression_state(tg: TracedGraph, state: Mapping[str, torch.Tensor], layers: list[FitLayer],
                     data: Iterable, endpoints: Sequence[tuple[TracedGraph, Mapping[str, torch.Tensor]]],
                     weights: Sequence[float] | Mix, *, ridge: float = DEFAULT_RIDGE, n_inputs: int = 1,
                     max_bytes: int | None = STAGED_BYTES) -> dict[str, torch.Tensor]:
    """A new state for graph ``tg`` with each layer of ``layers`` refit in graph order (see the
    module docstring). ``endpoints`` are (graph, state) pairs whose ``layer.target`` values, mixed
    by ``weights`` (one number per endpoint, or a function of the layer and the values that
    returns the goal, e.g. unit by unit for a widened layer), are the goals; ``n_inputs`` tensors of each batch of ``data`` are the forward's
    inputs; ``ridge`` (> 0) pulls each layer toward its merged weights.

    The data goes through once: the merged graph and the endpoints advance over every batch
    together (as REPAIR, `autoperm.merge.staged`). Where the values held would pass ``max_bytes``
    (None: no limit; 0: never try), memory runs out, or the goal nodes are out of order, each
    layer is measured with passes of its own over ``data``: the same result, more time."""
    check_ridge(ridge, "regression")
    data = list(data)
    batches = [stat_inputs(b, n_inputs, "regression normalization") for b in data]
    check_samples(sum(x[0].shape[0] for x in batches), "regression normalization")
    where = {n.name: i for i, n in enumerate(tg.graph.nodes)}
    layers = sorted(layers, key=lambda l: where[l.node])
    why = "max_bytes=0" if max_bytes is not None and max_bytes <= 0 else _monotone(tg, endpoints, layers)
    done, why = try_one_pass(
        lambda: _regress_staged(tg, dict(state), layers, batches, endpoints, weights, ridge, max_bytes), why)
    if done is not None:
        return done
    log.info("regression in one pass: %s; measuring each layer with passes of its own over data", why)
    state = dict(state)
    for layer in progress(layers, desc="regression layers, a pass each"):
        acc: dict = {}
        for x in batches:
            inp = run_graph(tg, state, x, {layer.input})[layer.input]
            values = [run_graph(g, s, x, {layer.target})[layer.target] for g, s in endpoints]
            _accumulate(layer, state[layer.weight].shape, inp, _goal(layer, values, weights, state), acc)
        state.update(_solve(layer, acc, state, ridge))
    return state
