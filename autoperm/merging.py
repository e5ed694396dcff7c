"""The user's entry points for alignment and merging: `match`, `align`, `merge`.

``merge(model_a, model_b)`` traces model_a (a spec can be passed instead), aligns model_b to it,
interpolates, and optionally normalizes. Neither model is modified; a new module of model_a's class
is returned.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import torch
from torch import nn

from ._copy import copy_module
from ._data import first_inputs
from .analysis import analyze_with_sites
from .frontend import capture, normalize_inputs
from .match import NEEDS_DATA, Alignment, MatchContext, run_matcher
from .merge import check_compatible, interpolate_state, reset_batchnorm
from .merge.normalize import has_batchnorm
from .merge.repair import channel_moments, find_layers, repair_state
from .permute import permute_state_dict
from .spec import PermutationSpec
from .verify import verify_spec

__all__ = ["match", "align", "merge", "infer_example_inputs"]

log = logging.getLogger(__name__)
NORMALIZATIONS = (None, "reset", "repair", "rescale")


def infer_example_inputs(model: nn.Module) -> tuple[torch.Tensor]:
    """Example inputs guessed from timm's ``pretrained_cfg`` or the first conv / linear / embedding."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    kw = {"dtype": p.dtype, "device": p.device} if p is not None else {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return (torch.randn(2, *cfg["input_size"], **kw),)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (torch.randn(2, m.in_features, **kw),)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)]
            return (torch.randn(2, m.in_channels, *([32] * nd), **kw),)
        if isinstance(m, nn.Embedding):
            return (torch.randint(0, m.num_embeddings, (2, 16), device=m.weight.device),)
    raise ValueError(f"cannot guess example inputs for {type(model).__name__}: pass example_inputs=")


def _inputs(model, example_inputs, data) -> tuple[torch.Tensor, ...]:
    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    if data is not None:
        got = first_inputs(data)
        if got is not None:
            log.info("example inputs taken from the first batch of data: %s", [tuple(t.shape) for t in got])
            return got
    got = infer_example_inputs(model)
    log.info("example inputs inferred from the model: %s", [tuple(t.shape) for t in got])
    return got


def _reiterable(data):
    """``data`` as something that can be iterated more than once (a generator becomes a list)."""
    if data is not None and iter(data) is data:
        return list(data)
    return data


def _compile_a(model_a: nn.Module, spec: PermutationSpec | None, example_inputs, data):
    """model_a's traced graph, its groups' activation sites, and a verified spec."""
    inputs = _inputs(model_a, example_inputs, data)
    traced = capture(model_a, inputs)
    compiled, sites = analyze_with_sites(traced)
    if spec is not None and [g.name for g in spec.groups] != [g.name for g in compiled.groups]:
        raise ValueError("this method compiles model_a's graph itself and got other groups than the "
                         "spec passed; pass spec=None")
    if spec is None:
        verify_spec(model_a, compiled, inputs)
    return spec or compiled, traced, sites


def match(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None = None, *,
          method: str = "weight", data: Iterable | None = None, example_inputs: Any = None,
          seed: int = 0, max_iter: int = 100, features: str = "pre") -> Alignment:
    """Find permutations of ``model_b``'s groups that line it up with ``model_a``.

    Returns an `Alignment` (``perms``, objective ``history`` per pass, ``seconds``). Example::

        al = autoperm.match(model_a, model_b, method="weight")
        model_b_aligned = autoperm.permute(model_b, al.spec, al.perms)
    """
    check_compatible(model_a, model_b)
    data = _reiterable(data)
    if method in NEEDS_DATA and data is None:
        raise ValueError(f"method={method!r} needs data=: an iterable of input batches")
    ctx = MatchContext(spec, model_a.state_dict(), model_b.state_dict(), seed, max_iter, data, features=features)
    if method in NEEDS_DATA or spec is None:
        ctx.spec, ctx.traced, ctx.sites = _compile_a(model_a, spec, example_inputs, data)
    else:
        spec.check_model(model_a.state_dict())
    spec = ctx.spec
    t0 = time.perf_counter()
    perms, history = run_matcher(method, ctx)
    return Alignment(perms, method, history, time.perf_counter() - t0, spec, ctx.traced)


def align(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None = None, *,
          method: str = "weight", data: Iterable | None = None, example_inputs: Any = None,
          seed: int = 0) -> dict[str, torch.Tensor]:
    """The permutations to apply to ``model_b`` (with `autoperm.permute`) to line it up with
    ``model_a``: ``match(...).perms``."""
    return match(model_a, model_b, spec, method=method, data=data, example_inputs=example_inputs, seed=seed).perms


def merge(model_a: nn.Module, model_b: nn.Module, *, alpha: float = 0.5, method: str = "weight",
          spec: PermutationSpec | None = None, data: Iterable | None = None, example_inputs: Any = None,
          normalize: str | None = None, seed: int = 0, alignment: Alignment | None = None) -> nn.Module:
    """A new model: ``(1 - alpha) * A + alpha * P(B)`` with ``P`` found by ``method``.

    ``alpha`` is the weight of model_b. ``normalize="reset"`` recomputes BatchNorm statistics on
    ``data``; ``"repair"`` sets each merged conv / linear layer's pre-activation mean and std per
    channel to the interpolation of the endpoints' (and resets BatchNorms), folded into the
    weights; ``"rescale"`` does the same for the std only (`autoperm.merge.repair`). With
    ``normalize=None`` BatchNorm statistics are interpolated (a hint is logged).
    Dims the spec froze are interpolated without alignment. ``alignment`` (from `match`) skips
    the matching, e.g. to merge at several alphas. Example::

        merged = autoperm.merge(model_a, model_b)                      # weight matching
        merged = autoperm.merge(model_a, model_b, normalize="reset", data=loader)
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not available; choose one of {list(NORMALIZATIONS)}")
    check_compatible(model_a, model_b)
    data = _reiterable(data)
    if normalize is not None and data is None:
        raise ValueError(f"normalize={normalize!r} measures activations and needs data=: pass an "
                         "iterable of input batches")
    al = alignment or match(model_a, model_b, spec, method=method, data=data, example_inputs=example_inputs,
                            seed=seed)
    aligned_b = permute_state_dict(model_b.state_dict(), al.spec, al.perms)
    state = interpolate_state(model_a.state_dict(), aligned_b, alpha)
    if normalize in ("repair", "rescale"):
        data = list(data)
        traced = al.traced or _compile_a(model_a, al.spec, example_inputs, data)[1]
        grouped = {ax.tensor for g in al.spec.groups for ax in g.axes if ax.dim == 0}
        layers = find_layers(traced, grouped)
        dense = [layer for layer in layers if layer.kind == "dense"]
        ma = channel_moments(traced, model_a.state_dict(), data, dense)
        mb = channel_moments(traced, aligned_b, data, dense)
        goal = {n: ((1 - alpha) * ma[n][0] + alpha * mb[n][0], (1 - alpha) * ma[n][1] + alpha * mb[n][1])
                for n in ma}
        state = repair_state(traced, state, layers, data, goal, mode=normalize)
        log.info("%s: %d dense layers, %d BatchNorm layers", normalize, len(dense), len(layers) - len(dense))
    merged = copy_module(model_a)
    merged.load_state_dict(state)
    if normalize == "reset":
        merged = reset_batchnorm(merged, data)
    elif has_batchnorm(merged):
        log.info("BatchNorm statistics were interpolated; normalize='reset' with data is usually far better")
    return merged.train(model_a.training)
