"""The user's entry points for alignment and merging: `match`, `align`, `merge`.

``merge(model_a, model_b)`` traces model_a (a spec can be passed instead), aligns model_b to it,
interpolates, and optionally normalizes. Neither model is modified; a new module of model_a's class
is returned. `autoperm.merge_many` (``autoperm/many.py``) merges more than two models.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ._args import check_seed, check_spec
from ._copy import copy_with_state, match_modes
from ._data import first_inputs, float_dtype, stat_inputs
from .analysis import analyze_with_sites
from .errors import ExampleInputError, ShapeMismatchError
from .example_inputs import input_count, resolve_inputs
from .frontend import capture
from .match import NEEDS_GRAPH, Alignment, MatchContext, check_method_args, run_matcher
from .merge import (average_states, calibrate_biases, check_compatible, count_layers, remove_biases,
                    reset_batchnorm)
from .merge.interpolate import as_alpha
from .merge.normalize import has_batchnorm
from .merge.regression import check_ridge
from .merge.repair import channel_moments, find_layers, repair_state
from .permute import permute_state_dict
from .spec import PermutationSpec
from .verify import verify_compiled

__all__ = ["match", "align", "merge"]

if TYPE_CHECKING:
    from .rewrite.partial import Partial

log = logging.getLogger(__name__)
NORMALIZATIONS = (None, "reset", "repair", "rescale", "regression", "bias_calibration", "bias_removal")
DATA_FREE = (None, "bias_calibration", "bias_removal")  # normalizations that need no data


def _reiterable(data):
    """``data`` as something that can be iterated more than once (a generator becomes a list)."""
    if isinstance(data, torch.Tensor):
        raise ValueError(f"data= must be an iterable of batches (a list of tensors, a DataLoader), got one Tensor "
                         f"of shape {list(data.shape)}, whose rows would be read as single unbatched samples: "
                         "pass [x] for one batch, or list(x.split(256))")
    if data is not None and iter(data) is data:
        return list(data)
    return data


def _dtype_hint(model: nn.Module, inputs) -> str:
    """A hint when floating inputs and the model's floating parameters differ in dtype."""
    dtype = float_dtype(model)
    other = sorted({str(t.dtype).replace("torch.", "") for t in inputs
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype})
    if dtype is None or not other:
        return ""
    want = str(dtype).replace("torch.", "")
    return (f" (the inputs are {'/'.join(other)} and the model's parameters {want}: cast the inputs and data=, "
            f"e.g. x.to(torch.{want}), or the model)")


def _compile_a(model_a: nn.Module, spec: PermutationSpec | None, example_inputs, data):
    """model_a's traced graph, its groups' activation sites, and a verified spec."""
    inputs = resolve_inputs(model_a, example_inputs, data, n_inputs=input_count(spec, example_inputs))
    try:
        traced = capture(model_a, inputs)
    except ExampleInputError as e:
        hint = _dtype_hint(model_a, inputs)
        if example_inputs is not None:
            if hint:
                raise ExampleInputError(f"{e}{hint}") from e
            raise
        source = "taken from the first batch of data=" if data is not None and first_inputs(data) is not None else \
            "guessed from the model's first layer"
        raise ExampleInputError(f"{e}{hint} (these example inputs were {source}: pass example_inputs= with inputs "
                                "the forward accepts, e.g. a tuple for a forward with several arguments)") from e
    compiled, sites = analyze_with_sites(traced)
    if spec is not None and [g.name for g in spec.groups] != [g.name for g in compiled.groups]:
        raise ValueError("this method compiles model_a's graph itself and got other groups than the "
                         "spec passed; pass spec=None")
    if spec is None:
        where = ("example_inputs=" if example_inputs is not None else "the first batch of data=" if data is not None
                 else "the example inputs guessed from model_a")
        verify_compiled(model_a, compiled, inputs, arg=where)
    return spec or compiled, traced, sites


def match(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None = None, *,
          method: str = "weight", data: Iterable | None = None, example_inputs: Any = None,
          loss_fn: Callable | None = None, seed: int = 0, max_iter: int = 100, features: str = "pre",
          steps: int | None = None, lr: float | None = None, starts: int | None = None,
          tol: float | None = None) -> Alignment:
    """Find permutations of ``model_b``'s groups that line it up with ``model_a``.

    ``method``: ``"identity"``, ``"weight"``, ``"activation"`` (needs ``data``), ``"sinkhorn"``
    (weight distance, or with ``loss_fn`` the midpoint loss on ``data``) or ``"ste"`` (needs
    ``data`` with targets and ``loss_fn(outputs, target)``). ``steps`` and ``lr`` set the step
    budget and Adam learning rate of ``"sinkhorn"`` / ``"ste"`` (defaults in
    `autoperm.match.DEFAULT_STEPS` / `DEFAULT_LR`). ``"weight"`` takes ``max_iter`` (passes per
    descent), ``starts`` (2 by default; 1 runs only the descent from the identity, about twice as
    fast) and ``tol`` (stop once a pass gains less than this share of the objective; default 0:
    only when a pass changes nothing). Returns an `Alignment` (``perms``, objective ``history``
    per pass or step, ``seconds``). Example::

        al = autoperm.match(model_a, model_b, method="weight")
        model_b_aligned = autoperm.permute(model_b, al.spec, al.perms)
        al = autoperm.match(model_a, model_b, method="ste", data=loader, loss_fn=F.cross_entropy)
        al = autoperm.match(model_a, model_b, starts=1, max_iter=1)   # fast: one pass of one descent
    """
    # not in check_method_args: merge hands the matcher its data for the normalization too
    if method == "sinkhorn" and data is not None and loss_fn is None:
        raise ValueError("method='sinkhorn' uses data= only with loss_fn= (the midpoint loss); without it the "
                         "weight distance is minimized and data would be ignored: pass loss_fn= or drop data=")
    return match_compiled(model_a, model_b, spec, None, method=method, data=data, example_inputs=example_inputs,
                          loss_fn=loss_fn, seed=seed, max_iter=max_iter, features=features, steps=steps, lr=lr,
                          starts=starts, tol=tol)


def match_compiled(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None, compiled: tuple | None, *,
                   method: str = "weight", data: Iterable | None = None, example_inputs: Any = None,
                   loss_fn: Callable | None = None, seed: int = 0, max_iter: int = 100, features: str = "pre",
                   steps: int | None = None, lr: float | None = None, starts: int | None = None,
                   tol: float | None = None, checked: bool = False) -> Alignment:
    """`match`, reusing ``compiled`` = (spec, traced graph, activation sites) from an earlier
    `_compile_a` of a model with model_a's architecture and constants (`merge_many` aligns many
    models to copies of one: one export instead of one per call); None compiles model_a.
    ``checked``: the caller has run `check_compatible` on the pair (or on models the pair is
    built from), so the tensors are not scanned again."""
    if spec is not None:
        check_spec(spec)
    if not checked:
        check_compatible(model_a, model_b)
    seed = check_seed(seed)
    data = _reiterable(data)
    n_inputs = input_count(spec, example_inputs)
    check_method_args(method, data, loss_fn, steps, lr, n_inputs, starts, tol, max_iter, features)
    ctx = MatchContext(spec, model_a.state_dict(), model_b.state_dict(), seed, max_iter, data, features=features,
                       loss_fn=loss_fn, steps=steps, lr=lr, model_a=model_a, n_inputs=n_inputs,
                       starts=starts, tol=tol)
    if method in NEEDS_GRAPH or spec is None:
        ctx.spec, ctx.traced, ctx.sites = compiled or _compile_a(model_a, spec, example_inputs, data)
    else:
        spec.check_model(model_a.state_dict())
    spec = ctx.spec
    t0 = time.perf_counter()
    perms, history = run_matcher(method, ctx)
    return Alignment(perms, method, history, time.perf_counter() - t0, spec, ctx.traced, ctx.sites)


def align(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None = None, *,
          method: str = "weight", data: Iterable | None = None, example_inputs: Any = None,
          loss_fn: Callable | None = None, seed: int = 0, steps: int | None = None,
          lr: float | None = None) -> dict[str, torch.Tensor]:
    """The permutations to apply to ``model_b`` (with `autoperm.permute`) to line it up with
    ``model_a``: ``match(...).perms``. Example::

        perms = autoperm.align(model_a, model_b, method="sinkhorn", steps=200)
    """
    return match(model_a, model_b, spec, method=method, data=data, example_inputs=example_inputs,
                 loss_fn=loss_fn, seed=seed, steps=steps, lr=lr).perms


def merge(model_a: nn.Module, model_b: nn.Module, *, alpha: float = 0.5, method: str = "weight",
          spec: PermutationSpec | None = None, data: Iterable | None = None, example_inputs: Any = None,
          normalize: str | None = None, preserve_first: int = 0, partial: float | dict | Partial = 0.0,
          loss_fn: Callable | None = None, seed: int = 0, alignment: Alignment | None = None,
          bias_layers: int | None = None, steps: int | None = None, lr: float | None = None,
          ridge: float | None = None) -> nn.Module:
    """A new model: ``(1 - alpha) * A + alpha * P(B)`` with ``P`` found by ``method``.

    ``alpha`` is the weight of model_b. ``normalize="reset"`` recomputes BatchNorm statistics on
    ``data``; ``"repair"`` sets each merged conv / linear layer's pre-activation mean and std per
    channel to the interpolation of the endpoints' (and resets BatchNorms), folded into the
    weights; ``"rescale"`` does the same for the std only (`autoperm.merge.repair`).
    ``"bias_calibration"`` sets the bias of the l-th counted conv / linear layer to
    ``(1 - alpha)^l b_A + alpha^l b_B``; ``"bias_removal"`` zeroes the biases of the last
    ``bias_layers`` counted layers (all with ``None``); both need no data (`autoperm.merge.bias`).
    ``"regression"`` refits each conv / linear layer, in graph order, by ridge regression so that
    its output on the merged model's own inputs matches the interpolation of the endpoints'
    outputs there (``ridge``, default 1e-2, pulls it toward the interpolated weights;
    `autoperm.merge.regression`); it usually removes far more of the barrier than REPAIR.
    With ``normalize=None`` BatchNorm statistics are interpolated (a hint is logged).
    ``loss_fn``, ``steps`` and ``lr`` go to `match` (methods ``"sinkhorn"`` / ``"ste"``); for
    the other matching options (``max_iter``, ``starts``, ``tol``, ``features``) call `match`
    and pass its result as ``alignment``.
    Dims the spec froze are interpolated without alignment. ``alignment`` (from `match`) skips
    the matching, e.g. to merge at several alphas.
    ``preserve_first=l`` (Preserve-First Merging, `autoperm.rewrite.pfm`) keeps the first ``l``
    counted layers of both models as two branches and merges the rest; ``partial=gamma`` (a
    number or ``{group: gamma}``, `autoperm.rewrite.partial`) keeps ``ceil(gamma * n)`` units of
    each group unmerged (forced assignment; ``partial=autoperm.Partial(gamma, assignment=
    "adaptive", threshold=eps)`` for the adaptive one). Both return a new emitted module (a
    ``torch.fx.GraphModule``) rather than one of model_a's class; ``preserve_first=0`` /
    ``partial=0`` give the plain merge. Example::

        merged = autoperm.merge(model_a, model_b)                      # weight matching
        merged = autoperm.merge(model_a, model_b, normalize="reset", data=loader)
        merged = autoperm.merge(model_a, model_b, normalize="bias_removal", bias_layers=2)
        wider = autoperm.merge(model_a, model_b, partial=0.25, data=loader)
    """
    check_normalize(normalize, data, bias_layers, ridge)
    alpha = as_alpha(alpha)
    check_preserve_first(preserve_first)
    _check_partial(partial)
    if partial and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha:g} with partial=: partial merging keeps each model's unmatched units "
                         "weighted by 1 - alpha and alpha, so alpha must lie in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        log.warning("alpha=%g lies outside [0, 1]: extrapolating past %s", alpha, "model_a" if alpha < 0 else "model_b")
    check_compatible(model_a, model_b)
    data = _reiterable(data)
    if preserve_first and partial:
        raise ValueError("preserve_first > 0 together with partial > 0 is not supported (v1): pick one")
    al = alignment or match_compiled(model_a, model_b, spec, None, method=method, data=data,
                                     example_inputs=example_inputs, loss_fn=loss_fn, seed=seed, steps=steps, lr=lr,
                                     checked=True)
    if alignment is not None:
        try:
            alignment.spec.check_model(model_a.state_dict())
        except ShapeMismatchError as e:
            raise ShapeMismatchError(f"alignment= was computed for other models: {e}. Pass the Alignment that "
                                     "autoperm.match returned for these two models") from e
    if preserve_first or partial:  # merges that change the architecture: autoperm.rewrite
        from .rewrite import rewrite_merge

        return rewrite_merge(model_a, model_b, al, alpha=alpha, preserve_first=preserve_first, partial=partial,
                             normalize=normalize, data=data, example_inputs=example_inputs, ridge=ridge,
                             bias_layers=bias_layers)
    aligned_b = permute_state_dict(model_b.state_dict(), al.spec, al.perms)
    return combine(model_a, [model_a.state_dict(), aligned_b], [1 - alpha, alpha], al, normalize=normalize,
                   data=data, example_inputs=example_inputs, bias_layers=bias_layers, ridge=ridge,
                   models=[model_a, model_b])


def check_preserve_first(preserve_first: Any) -> None:
    """Raise unless ``preserve_first`` is an integer >= 0 (numpy integers too, never a bool)."""
    if isinstance(preserve_first, bool) or not isinstance(preserve_first, numbers.Integral) or preserve_first < 0:
        raise ValueError(f"preserve_first must be a non-negative int (the number of counted layers to keep "
                         f"unmerged), got {preserve_first!r}")


def _check_partial(partial: Any) -> None:
    from .rewrite.partial import Partial

    if isinstance(partial, bool) or not isinstance(partial, (numbers.Real, Mapping, Partial)):
        raise ValueError(f"partial={partial!r}: pass a share of buffer units in [0, 1], a dict "
                         "{group name: share}, or an autoperm.Partial(...) with the assignment options")


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` comes up in this process (an
    interpolation curve merges many times), at INFO after that."""
    log.log(logging.INFO if key in _WARNED else logging.WARNING, message)
    _WARNED.add(key)


def check_normalize(normalize: str | None, data: Any, bias_layers: int | None, ridge: float | None = None) -> None:
    """Raise naming the parameter when a normalization is unknown or lacks what it needs."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not available; choose one of {list(NORMALIZATIONS)}")
    if normalize not in DATA_FREE and data is None:
        raise ValueError(f"normalize={normalize!r} measures activations and needs data=: pass an "
                         "iterable of input batches")
    if bias_layers is not None and normalize != "bias_removal":
        raise ValueError(f"bias_layers= is used only by normalize='bias_removal' (got normalize={normalize!r}): "
                         "drop it or pass normalize='bias_removal'")
    check_ridge(ridge, normalize)


def _endpoint_graphs(traced, models: Sequence[nn.Module] | None, count: int, data: list, n_inputs: int) -> list:
    """model_a's traced graph once per endpoint (``count`` of them), each with that model's own
    keyless constants (non-persistent buffers: model_b's may differ from model_a's), for the goal
    statistics; with ``models=None`` every endpoint uses model_a's."""
    if not traced.constants or not models:
        return [traced] * count
    if len(models) != count:
        raise ValueError(f"combine: {len(models)} models for {count} states")
    inputs = tuple(t[:2] for t in stat_inputs(data[0], n_inputs, "normalization statistics"))
    out = [traced]
    for i, model in enumerate(models[1:], 1):
        own = capture(model, inputs).constants
        same = {k: v for k, v in own.items() if k in traced.constants and v.shape == traced.constants[k].shape}
        odd = sorted(set(own) & set(traced.constants) - set(same))
        if odd:
            log.warning("models[%d]'s keyless constant %s has shape %s, model_a's %s: its goal statistics use "
                        "model_a's value there", i, odd[0], tuple(own[odd[0]].shape),
                        tuple(traced.constants[odd[0]].shape))
        out.append(dataclasses.replace(traced, constants={**traced.constants, **same}))
    return out


def combine(model_a: nn.Module, states: list, weights: list[float], al: Alignment, *, normalize: str | None,
            data: Any, example_inputs: Any, bias_layers: int | None = None, ridge: float | None = None,
            models: Sequence[nn.Module] | None = None) -> nn.Module:
    """A new module of model_a's class holding ``sum_i weights[i] * states[i]`` (the states
    already aligned to one frame), then normalized; shared by `merge` and `merge_many`.
    ``models`` (the endpoints, in the order of ``states``) give the goal statistics their own
    keyless constants."""
    state = average_states(states, weights)
    traced = al.traced
    # inputs per batch: from example_inputs, else from the graph the alignment traced
    n_inputs = input_count(al.spec, example_inputs, traced)
    if normalize in ("repair", "rescale"):
        data = list(data)
        traced = traced or _compile_a(model_a, al.spec, example_inputs, data)[1]
        grouped = {ax.tensor for g in al.spec.groups for ax in g.axes if ax.dim == 0}
        layers = find_layers(traced, grouped)
        dense = [layer for layer in layers if layer.kind == "dense"]
        # the endpoints' statistics (no pass at all where every merged layer feeds a BatchNorm)
        graphs = _endpoint_graphs(traced, models, len(states), data, n_inputs) if dense else []
        moments = [channel_moments(g, s, data, dense, n_inputs) for g, s in zip(graphs, states, strict=True)] \
            if dense else []
        goal = {n: (sum(w * m[n][0] for w, m in zip(weights, moments)),
                    sum(w * m[n][1] for w, m in zip(weights, moments))) for n in (moments[0] if moments else {})}
        state = repair_state(traced, state, layers, data, goal, mode=normalize, n_inputs=n_inputs)
        log.info("%s: %d dense layers, %d BatchNorm layers", normalize, len(dense), len(layers) - len(dense))
    elif normalize == "regression":
        from .merge.regression import DEFAULT_RIDGE, find_fit_layers, regression_state

        data = list(data)
        traced = traced or _compile_a(model_a, al.spec, example_inputs, data)[1]
        layers = find_fit_layers(traced)
        graphs = _endpoint_graphs(traced, models, len(states), data, n_inputs)
        state = regression_state(traced, state, layers, data, list(zip(graphs, states, strict=True)), weights,
                                 ridge=DEFAULT_RIDGE if ridge is None else ridge, n_inputs=n_inputs)
        log.info("regression: %d conv / linear layers refit", len(layers))
        fitted_through = {lay.bn[2] for lay in layers if lay.bn is not None}
        stale = [k for k in state if k.endswith("running_mean") and k not in fitted_through]
        if stale and sum(w > 0 for w in weights) > 1:
            _warn_once("bn-regression", f"regression refit no layer through the BatchNorm of {stale[0]} "
                       f"({len(stale)} in all): its statistics stay interpolated")
    elif normalize in ("bias_calibration", "bias_removal"):
        traced = traced or _compile_a(model_a, al.spec, example_inputs, data)[1]
        counted = count_layers(traced)
        if normalize == "bias_calibration":
            state = calibrate_biases(state, states, weights, counted)
        else:
            state = remove_biases(state, counted, bias_layers)
    merged = copy_with_state(model_a, state)
    if normalize == "reset":
        merged = reset_batchnorm(merged, data, n_inputs)
    elif normalize not in ("repair", "rescale", "regression") and has_batchnorm(merged) and \
            sum(w > 0 for w in weights) > 1:
        # (REPAIR and RESCALE set every BatchNorm's statistics to the merged model's exact ones)
        _warn_once("bn", "BatchNorm statistics were interpolated, which usually breaks a merged model; "
                   "normalize='reset' with data= (on the command line: --normalize reset --data FILE) "
                   "recomputes them")
    return match_modes(merged, model_a)  # reset_batchnorm leaves it in eval mode
