"""Interpolation curves and barriers.

* Loss barrier (Knowledge Transfer in the Wild, ../papers/000, Eq. 1):
  ``max_alpha L(f_alpha) - ((1 - alpha) L(f_A) + alpha L(f_B))``.
* Accuracy barrier (the Vanishing Feature paper, ../papers/003, caption of Figure 6):
  ``max_alpha (1 - alpha) Acc(f_A) + alpha Acc(f_B) - Acc(f_alpha)``.

Both are maxima over the alphas evaluated (include 0 and 1). Here alpha is the weight of model B.

Example::

    curve = autoperm.interpolate(a, b, [0, 0.25, 0.5, 0.75, 1], evaluate=lambda m: {"acc": acc(m)})
    curve.accuracy_barrier("acc")
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from torch import nn

log = logging.getLogger(__name__)

__all__ = ["Curve", "interpolate", "loss_barrier", "accuracy_barrier"]


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """``max_alpha L(alpha) - ((1 - alpha) L(0) + alpha L(1))``; alphas must include 0 and 1."""
    la, lb = _ends(alphas, losses)
    return _max([l - ((1 - a) * la + a * lb) for a, l in zip(alphas, losses)])


def accuracy_barrier(alphas: Sequence[float], accs: Sequence[float]) -> float:
    """``max_alpha (1 - alpha) Acc(0) + alpha Acc(1) - Acc(alpha)``; alphas must include 0 and 1."""
    aa, ab = _ends(alphas, accs)
    return _max([(1 - a) * aa + a * ab - v for a, v in zip(alphas, accs)])


def _max(gaps: list[float]) -> float:
    """The largest gap, NaN if any is NaN (Python's max skips a NaN that is not first): a diverged
    model has no barrier, not a barrier of 0."""
    if any(g != g for g in gaps):
        log.warning("a value on the curve is NaN: the barrier is NaN")
        return float("nan")
    return max(gaps)


def _ends(alphas, values):
    alphas, values = list(alphas), list(values)
    if len(alphas) != len(values):
        raise ValueError(f"got {len(alphas)} alphas but {len(values)} values: pass one value per alpha")
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"alphas {alphas} repeat a value: pass each alpha once")
    if 0 not in alphas or 1 not in alphas:
        raise ValueError("a barrier needs alpha = 0 and alpha = 1 among the alphas")
    return values[alphas.index(0)], values[alphas.index(1)]


@dataclass
class Curve:
    """Values of ``evaluate`` along the interpolation path; ``values[i]`` is a dict of metrics."""

    alphas: list[float]
    values: list[dict[str, float]] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        """The values of metric ``key`` per alpha; ``"value"`` is what a number-returning
        ``evaluate`` gave, and is used when ``key`` is not there."""
        if self.values and all(key not in v and "value" in v for v in self.values):
            return [v["value"] for v in self.values]
        missing = [i for i, v in enumerate(self.values) if key not in v]
        if missing:
            raise KeyError(f"metric {key!r} is not in the curve (it has {sorted(self.values[missing[0]])}): pass "
                           "key= the name evaluate returned")
        return [v[key] for v in self.values]

    def loss_barrier(self, key: str = "loss") -> float:
        return loss_barrier(self.alphas, self.series(key))

    def accuracy_barrier(self, key: str = "acc") -> float:
        return accuracy_barrier(self.alphas, self.series(key))


def interpolate(model_a: nn.Module, model_b: nn.Module, alphas: Sequence[float],
                evaluate: Callable[[nn.Module], Any], *, method: str = "weight", **merge_kwargs) -> Curve:
    """Evaluate ``merge(model_a, model_b, alpha=a, method=method, ...)`` for each alpha.

    ``evaluate(model)`` returns a number (stored as ``"value"``) or a dict of numbers. The
    alignment is computed once and reused for every alpha. With a ``normalize=`` that measures
    data, the endpoints 0 and 1 are normalized models too (A and aligned B with, e.g., their
    BatchNorm statistics recomputed), and barriers are measured against them; evaluate the
    models themselves to compare with the originals.
    """
    from .merging import _reiterable, match, merge

    alphas = _alpha_list(alphas)
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable taking the merged model and returning a number or a dict of "
                        f"numbers, got {type(evaluate).__name__}")
    bad = [a for a in alphas if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a)]
    if not alphas or bad:
        raise ValueError(f"alphas={alphas!r}: pass finite numbers, e.g. [0, 0.25, 0.5, 0.75, 1]"
                         + (f" ({bad[0]!r} is not one)" if bad else ""))
    alphas = [float(a) for a in alphas]
    if "data" in merge_kwargs:  # a generator would be used up by the first alpha
        merge_kwargs["data"] = _reiterable(merge_kwargs["data"])
    if "alignment" not in merge_kwargs:
        keys = ("spec", "data", "example_inputs", "seed", "loss_fn", "steps", "lr")
        if method == "sinkhorn" and merge_kwargs.get("loss_fn") is None:
            keys = tuple(k for k in keys if k != "data")  # the weight distance needs no data
        merge_kwargs["alignment"] = match(model_a, model_b, method=method,
                                          **{k: merge_kwargs[k] for k in keys if k in merge_kwargs})
    curve = Curve(alphas)
    for a in alphas:
        out = evaluate(merge(model_a, model_b, alpha=a, method=method, **merge_kwargs))
        curve.values.append(dict(out) if isinstance(out, dict) else {"value": _number(out, a)})
    return curve


def _alpha_list(alphas: Any) -> list:
    """``alphas`` as a list: a sequence of numbers, or a 1-D tensor / NumPy array."""
    if hasattr(alphas, "tolist") and hasattr(alphas, "ndim") and not isinstance(alphas, (str, bytes)):
        if alphas.ndim != 1:
            raise ValueError(f"alphas must be 1-D (one value per point of the curve), got an array of shape "
                             f"{tuple(alphas.shape)}")
        return alphas.tolist()
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Iterable):
        raise TypeError(f"alphas must be a sequence of numbers, e.g. [0, 0.5, 1] or torch.linspace(0, 1, 11), got "
                        f"{type(alphas).__name__} ({alphas!r}); for one model pass [alpha] or call autoperm.merge")
    return list(alphas)


def _number(out: Any, alpha: float) -> float:
    """What ``evaluate`` returned at ``alpha`` as a float (a number, a NumPy scalar, a one-element tensor)."""
    why: Exception | None = None
    if not isinstance(out, (str, bytes)):
        try:
            return float(out)
        except (TypeError, ValueError, RuntimeError) as e:
            why = e
    raise TypeError(f"evaluate must return a number or a dict of numbers; at alpha={alpha:g} it returned "
                    f"{type(out).__name__} ({str(out)[:60]!r})") from why
