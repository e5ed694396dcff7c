"""Interpolation of two aligned state dicts: ``(1 - alpha) * A + alpha * P(B)``.

alpha is the weight of model B (0 gives A, 1 gives aligned B). Floating-point tensors are
interpolated, including BatchNorm running statistics (a plain average of statistics is usually
poor: ``normalize="reset"`` recomputes them on data); integer buffers are taken from A.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Mapping, Sequence

import torch
from torch import nn

from .._args import check_materialized, check_module
from ..errors import SpecError

__all__ = ["check_compatible", "interpolate_state", "average_states", "as_alpha"]

log = logging.getLogger(__name__)


def check_compatible(model_a: nn.Module, model_b: nn.Module, names: tuple[str, str] = ("model_a", "model_b")) -> None:
    """Raise naming the first difference: a missing tensor, a shape, a dtype, a device, or a
    non-finite value (``names``: what to call the two models in the message)."""
    first, second = names
    for who, m in ((first, model_a), (second, model_b)):
        check_module(m, who)
        check_materialized(m, who)
    _note_classes(model_a, model_b, names)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for name in list(sa) + [n for n in sb if n not in sa]:
        if name not in sa or name not in sb:
            which = second if name not in sb else first
            raise SpecError(f"the models' architectures differ: {which} has no tensor {name!r}")
        ta, tb = sa[name], sb[name]
        if ta.shape != tb.shape:
            raise SpecError(f"the models' architectures differ: {name!r} has shape {list(ta.shape)} in "
                            f"{first} and {list(tb.shape)} in {second}")
        if ta.dtype != tb.dtype or ta.device != tb.device:
            raise SpecError(f"{name!r} is {ta.dtype} on {ta.device} in {first} but {tb.dtype} on "
                            f"{tb.device} in {second}; move both models to one device and dtype first")
        for who, t in ((first, ta), (second, tb)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{who} has non-finite values in {name!r}")


def _note_classes(model_a: nn.Module, model_b: nn.Module, names: tuple[str, str]) -> None:
    """Warn when the models are of different classes: their tensors may match while their
    forwards differ, and what is returned runs the first model's forward. Two GraphModules
    (each emitted module has a class of its own) count as one class when their code and
    submodule classes agree."""
    if _same_forward(model_a, model_b):
        return
    log.warning("%s is a %s but %s is a %s: their tensors are aligned and merged as if both ran %s's forward, "
                "which the result runs; pass two models of one class if the forwards differ",
                names[0], _class_name(model_a), names[1], _class_name(model_b), names[0])


def _same_forward(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is type(b):
        return True
    if not (isinstance(a, torch.fx.GraphModule) and isinstance(b, torch.fx.GraphModule)):
        return False
    kinds = [[(n, type(m).__qualname__, getattr(m, "code", None)) for n, m in x.named_modules()] for x in (a, b)]
    return kinds[0] == kinds[1]  # the code of every GraphModule in them, the root's included


def _class_name(m: nn.Module) -> str:
    if isinstance(m, torch.fx.GraphModule):
        return f"torch.fx.GraphModule {type(m).__name__!r}"
    return f"{type(m).__module__}.{type(m).__qualname__}"


def as_alpha(alpha) -> float:
    """``alpha`` as a float: any real number (Python, NumPy, a one-element tensor); raises a
    ValueError naming ``alpha`` for anything else or a non-finite value."""
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 and not alpha.is_complex():
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be a finite number (the weight of model_b), got {alpha!r}")
    return float(alpha)


def interpolate_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` for float tensors; other tensors from ``a``."""
    alpha = as_alpha(alpha)
    out = {}
    for name, ta in a.items():
        tb = b[name]
        out[name] = torch.lerp(ta, tb.to(ta.dtype), float(alpha)) if ta.is_floating_point() else ta.clone()
    return out


def average_states(states: Sequence[Mapping[str, torch.Tensor]],
                   weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """``sum_i weights[i] * states[i]`` for float tensors (equal weights by default); other
    tensors from the first state. Two states give exactly `interpolate_state` (``torch.lerp``)."""
    if not states:
        raise ValueError("average_states needs at least one state dict")
    weights = [1.0 / len(states)] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {len(states)} finite numbers, got {weights!r}")
    if len(states) == 2 and abs(weights[0] + weights[1] - 1.0) < 1e-15:
        return interpolate_state(states[0], states[1], weights[1])
    out = {}
    for name, t0 in states[0].items():
        if t0.is_floating_point():
            acc = sum(w * s[name].to(t0.dtype) for w, s in zip(weights, states))
            out[name] = acc
        else:
            out[name] = t0.clone()
    return out
