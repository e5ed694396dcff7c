"""Which groups to widen under a parameter budget: the benefit-factor order of the Partial Model
Merging thesis (../papers/004, section 4.8).

Each group is widened alone (gamma = 1 there, full merging elsewhere); its *benefit factor* is
the gain of ``evaluate`` over the full merge divided by the parameters it adds. Groups are then
taken in decreasing benefit order while the parameter count stays within the budget. The count
is recomputed for each candidate set from the widened shapes (data-free; the thesis's
"immediately obvious improvement" in chapter 5: widening a layer next to an already widened one
is cheaper), and a group that would overshoot the budget is skipped, not the end of the list.

Example (widen the most useful groups with at most 30% more parameters)::

    al = autoperm.match(model_a, model_b, method="activation", data=batches)
    gammas = benefit_order(model_a, model_b, al, batches, evaluate=accuracy, budget=0.3)
    merged = autoperm.rewrite.partial.partial_merge(model_a, model_b, al, partial=gammas, data=batches)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..spec import PermutationSpec
from .partial_graph import param_layouts
from .partial_widen import Extension, buffer_count, widen_dim

__all__ = ["Benefit", "benefit_factors", "benefit_order", "widened_params"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benefit:
    """One group widened alone: the metric gained over the full merge, the parameters added,
    and their ratio (the benefit factor)."""

    gain: float
    params: int
    factor: float


def _metric(value: Any) -> float:
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise ValueError("evaluate must return one number (higher is better), or a dict with one entry; "
                             f"got keys {sorted(value)}")
        value = next(iter(value.values()))
    return float(value)


def widened_params(spec: PermutationSpec, model: nn.Module, widths: Mapping[str, int]) -> int:
    """Parameter elements of ``model`` once each group ``g`` has ``widths[g]`` units (missing
    groups keep their size): computed from shapes, no data and no model is built."""
    ext = {}
    for g in spec.groups:
        w = max(int(widths.get(g.name, g.size)), g.size)
        ext[g.name] = Extension(torch.cat([torch.arange(g.size), torch.full((w - g.size,), -1)]),
                                torch.cat([torch.full((g.size,), -1), torch.arange(w - g.size)]) if w > g.size
                                else torch.arange(g.size))
    lays = param_layouts(spec)
    total = 0
    for name, p in model.named_parameters():
        shape = list(p.shape)
        for dim, ls in lays.get(name, {}).items():
            shape[dim] = int(widen_dim(shape[dim], ls, ext)[0].numel())
        total += int(torch.Size(shape).numel())
    return total


def benefit_factors(model_a: nn.Module, model_b: nn.Module, alignment, data: Iterable,
                    evaluate: Callable[[nn.Module], Any], *, alpha: float = 0.5, gamma: float = 1.0,
                    normalize: str | None = None, example_inputs: Any = None,
                    groups: Iterable[str] | None = None, **partial_kwargs) -> dict[str, Benefit]:
    """Widen each group alone by ``gamma`` and measure ``evaluate`` (one number, higher is better,
    e.g. accuracy) against the full merge. Groups that cannot be widened are left out."""
    from .partial import partial_widen

    data = list(data)
    spec = alignment.spec
    names = list(groups) if groups is not None else [g.name for g in spec.groups]
    common = dict(alpha=alpha, normalize=normalize, data=data, example_inputs=example_inputs, **partial_kwargs)
    base = partial_widen(model_a, model_b, alignment, partial=0.0, **common)
    score0 = _metric(evaluate(base.module))
    out: dict[str, Benefit] = {}
    for name in names:
        res = partial_widen(model_a, model_b, alignment, partial={name: gamma}, **common)
        if name in res.frozen or res.widths[name][1] == res.widths[name][0]:
            log.info("benefit order: group %s cannot be widened (%s)", name, res.frozen.get(name, "no buffer"))
            continue
        added = res.params - base.params
        gain = _metric(evaluate(res.module)) - score0
        out[name] = Benefit(gain, added, gain / max(added, 1))
        log.info("benefit order: %s gains %.4g for %d parameters", name, gain, added)
    return out


def benefit_order(model_a: nn.Module, model_b: nn.Module, alignment, data: Iterable,
                  evaluate: Callable[[nn.Module], Any], budget: float = 0.3, *, gamma: float = 1.0,
                  factors: Mapping[str, Benefit] | None = None, fill: bool = True, **kwargs) -> dict[str, float]:
    """``{group: gamma}`` for the groups to widen, in decreasing benefit factor, while the merged
    model has at most ``(1 + budget)`` times model A's parameters. Groups whose widening did not
    help (gain <= 0) are never chosen. With ``fill`` the budget left over is given to the best
    group that did not fit, at the largest gamma (a multiple of 0.05) that fits. ``factors``
    (from `benefit_factors`) skips the measuring."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise ValueError(f"budget={budget!r}: the allowed parameter increase must be a number >= 0 (0.3 = +30%)")
    factors = factors if factors is not None else benefit_factors(model_a, model_b, alignment, data, evaluate,
                                                                  gamma=gamma, **kwargs)
    spec = alignment.spec
    base = sum(p.numel() for p in model_a.parameters())
    limit = (1.0 + float(budget)) * base
    chosen: dict[str, float] = {}
    widths: dict[str, int] = {}
    left: list[str] = []
    for name, b in sorted(factors.items(), key=lambda kv: -kv[1].factor):
        if b.gain <= 0:
            continue
        n = spec.group(name).size
        trial = {**widths, name: n + buffer_count(gamma, n)}
        if widened_params(spec, model_a, trial) <= limit:
            widths, chosen[name] = trial, float(gamma)
        else:
            left.append(name)
    for name in left[:1] if fill else []:
        n = spec.group(name).size
        for step in range(int(round(gamma / 0.05)) - 1, 0, -1):
            g = round(step * 0.05, 2)
            if widened_params(spec, model_a, {**widths, name: n + buffer_count(g, n)}) <= limit:
                chosen[name] = g
                break
    log.info("benefit order: widening %s within +%.0f%% parameters", chosen, 100 * budget)
    return chosen
