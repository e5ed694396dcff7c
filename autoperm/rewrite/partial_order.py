"""Which groups to widen under a parameter budget: the benefit-factor order of the Partial Model
Merging thesis (../papers/004, section 4.8).

Each group is widened alone (gamma = 1 there, full merging elsewhere); its *benefit factor* is
the gain of ``evaluate`` over the full merge divided by the parameters it adds. Groups are then
taken in decreasing benefit order while the parameter count stays within the budget. The count
is recomputed for each candidate set from the widened shapes (data-free; the thesis's
"immediately obvious improvement" in chapter 5: widening a layer next to an already widened one
is cheaper), and a group that would overshoot the budget is skipped, not the end of the list.

`benefit_greedy` is the thesis's second proposed improvement (chapter 5: "expand each layer
step-wise, re-evaluate the benefits, and then potentially choose a different layer to expand a
bit more"): starting from the full merge, each round tries one more step of gamma on every group,
keeps the step with the best metric gain per added parameter, and stops when the budget is spent
or no step helps. Its path (one point per accepted step) is the whole budget curve in one run.

Example (widen the most useful groups with at most 30% more parameters)::

    al = autoperm.match(model_a, model_b, method="activation", data=batches)
    gammas = benefit_order(model_a, model_b, al, batches, evaluate=accuracy, budget=0.3)
    gammas = benefit_greedy(model_a, model_b, al, batches, evaluate=neg_loss, budget=0.3).gammas
    merged = autoperm.rewrite.partial.partial_merge(model_a, model_b, al, partial=gammas, data=batches)
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..spec import PermutationSpec
from .partial_graph import param_layouts
from .._progress import progress
from .partial_widen import Extension, buffer_count, widen_dim

__all__ = ["Benefit", "Greedy", "GreedyStep", "benefit_factors", "benefit_greedy", "benefit_order", "widened_params"]

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
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError) as e:  # a string, None, a tensor of several elements
        raise ValueError(f"evaluate returned {value!r:.80}: it must return one number (higher is better)") from e
    if not math.isfinite(out):
        raise ValueError(f"evaluate returned {out}: it must return a finite number (higher is better)")
    return out


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget={budget!r}: the allowed parameter increase must be a finite number >= 0 "
                         "(0.3 = +30%)")


def _widths(spec: PermutationSpec, gammas: Mapping[str, float]) -> dict[str, int]:
    """Units per group once each group ``g`` in ``gammas`` is widened by ``gammas[g]``."""
    return {g: spec.group(g).size + buffer_count(x, spec.group(g).size) for g, x in gammas.items()}


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
    from ..example_inputs import rewrite_graph
    from .partial import partial_widen

    if data is None:
        raise ValueError("data=None: pass the batches the partial merges are built and normalized with "
                         "(an iterable of input batches)")
    data = list(data)
    spec = alignment.spec
    names = list(groups) if groups is not None else [g.name for g in spec.groups]
    partial_kwargs["traced"], _ = rewrite_graph(model_a, alignment, example_inputs, data,
                                                partial_kwargs.get("traced"))  # traced once for every trial
    common = dict(alpha=alpha, normalize=normalize, data=data, example_inputs=example_inputs, **partial_kwargs)
    base = partial_widen(model_a, model_b, alignment, partial=0.0, **common)
    score0 = _metric(evaluate(base.module))
    out: dict[str, Benefit] = {}
    for name in progress(names, desc="benefit factors", total=len(names)):
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
    help (gain <= 0) are never chosen. With ``fill`` the budget left over goes to the groups that
    did not fit, in benefit order, each at the largest gamma (a multiple of 0.05) that still fits,
    so no further 0.05 step of any of them fits. ``factors`` (from `benefit_factors`) skips the
    measuring."""
    _check_budget(budget)
    factors = factors if factors is not None else benefit_factors(model_a, model_b, alignment, data, evaluate,
                                                                  gamma=gamma, **kwargs)
    spec = alignment.spec
    base = sum(p.numel() for p in model_a.parameters())
    limit = (1.0 + float(budget)) * base
    chosen: dict[str, float] = {}
    left: list[str] = []
    for name, b in sorted(factors.items(), key=lambda kv: -kv[1].factor):
        if b.gain <= 0:
            continue
        trial = {**chosen, name: float(gamma)}
        if widened_params(spec, model_a, _widths(spec, trial)) <= limit:
            chosen = trial
        else:
            left.append(name)
    for name in left if fill else []:
        for step in range(int(round(gamma / 0.05)) - 1, 0, -1):
            g = round(step * 0.05, 2)
            if widened_params(spec, model_a, _widths(spec, {**chosen, name: g})) <= limit:
                chosen[name] = g
                break
    log.info("benefit order: widening %s within +%.0f%% parameters", chosen, 100 * budget)
    return chosen


@dataclass(frozen=True)
class GreedyStep:
    """One accepted step of `benefit_greedy`: the gammas after it, the parameter count of the
    merged model they give, and its ``evaluate`` score."""

    gammas: dict[str, float]
    params: int
    score: float


@dataclass
class Greedy:
    """The path of `benefit_greedy`: ``path[0]`` is the full merge, each later entry one
    accepted step; ``base`` is model A's parameter count; ``evaluations`` counts the calls of
    ``evaluate``; ``frozen`` names the groups left out of the search, with the reason (cannot be
    widened, or ``evaluate`` gave a non-finite score there)."""

    path: list[GreedyStep]
    base: int
    evaluations: int = 0
    frozen: dict[str, str] = field(default_factory=dict)

    @property
    def gammas(self) -> dict[str, float]:
        """The gammas of the last step (within the budget the search was given)."""
        return dict(self.path[-1].gammas)

    def at(self, budget: float) -> dict[str, float]:
        """The gammas of the last step of this path with at most ``(1 + budget)`` times model A's
        parameters (a search given that budget takes the same steps up to there, and may then go
        on with smaller ones that still fit)."""
        _check_budget(budget)
        ok = [s for s in self.path if s.params <= (1.0 + budget) * self.base]
        return dict(ok[-1].gammas) if ok else {}


def benefit_greedy(model_a: nn.Module, model_b: nn.Module, alignment, data: Iterable,
                   evaluate: Callable[[nn.Module], Any], budget: float = 0.3, *, step: float = 0.25,
                   groups: Iterable[str] | None = None, alpha: float = 0.5, normalize: str | None = None,
                   example_inputs: Any = None, **partial_kwargs) -> Greedy:
    """Step-wise greedy widening under a parameter budget (thesis chapter 5; module docstring).

    Each round widens, in turn, every group not yet at gamma 1 by ``step`` more (from what it
    has), skips candidates whose merged model would exceed ``(1 + budget)`` times model A's
    parameters (counted from shapes, no model built), builds and scores the others with
    ``evaluate`` (one number, higher is better: a smooth one such as minus the loss on held-out
    training data separates small steps better than accuracy), and accepts the candidate with
    the largest gain per added parameter if its gain is positive. Parameters are those of the
    built candidate (with ``assignment="adaptive"`` in ``partial_kwargs`` fewer pairs may split
    than gamma allows). Costs about (groups x accepted steps) partial merges. Gains are not
    monotone in gamma: a small ``step`` (at least 0.01) can stop early where no single step helps.
    Returns a `Greedy` whose ``gammas`` go to ``partial=`` and whose
    ``path`` holds every accepted step. Example::

        path = benefit_greedy(a, b, al, batches, evaluate=lambda m: -loss(m), budget=0.3,
                              normalize="repair")
        merged = autoperm.merge(a, b, alignment=al, partial=path.gammas, normalize="repair", data=batches)
    """
    from ..example_inputs import rewrite_graph
    from .partial import partial_widen

    _check_budget(budget)
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not 0.01 <= float(step) <= 1.0:
        raise ValueError(f"step={step!r}: the gamma added per step must be a number in [0.01, 1]")
    if data is None:
        raise ValueError("data=None: pass the batches the partial merges are built and normalized with "
                         "(an iterable of input batches)")
    if isinstance(groups, str):
        raise ValueError(f"groups={groups!r}: pass a list of group names, e.g. [{groups!r}]")
    if "partial" in partial_kwargs:
        raise ValueError("partial= is what benefit_greedy chooses: drop it (pass groups= to limit the search)")
    data = list(data)
    spec = alignment.spec
    names = list(dict.fromkeys(groups)) if groups is not None else [g.name for g in spec.groups]
    unknown = [n for n in names if n not in {g.name for g in spec.groups}]
    if unknown:
        raise ValueError(f"groups={unknown!r}: not groups of the alignment's spec; see alignment.spec.groups")
    partial_kwargs["traced"], _ = rewrite_graph(model_a, alignment, example_inputs, data,
                                                partial_kwargs.get("traced"))  # traced once for every trial
    common = dict(alpha=alpha, normalize=normalize, data=data, example_inputs=example_inputs, **partial_kwargs)
    full = partial_widen(model_a, model_b, alignment, partial=0.0, **common)
    base, limit = full.params_base, (1.0 + float(budget)) * full.params_base
    score = _metric(evaluate(full.module))
    out = Greedy([GreedyStep({}, full.params, score)], base, evaluations=1)
    gammas: dict[str, float] = {}
    params = full.params
    while True:
        best = None
        for name in progress(names, desc=f"benefit greedy step {len(out.path)}", total=len(names)):
            if name in out.frozen or gammas.get(name, 0.0) >= 1.0:
                continue
            trial, predicted = dict(gammas), 0
            while predicted <= 0 and trial.get(name, 0.0) < 1.0:  # a small group may need several steps for a unit
                trial[name] = round(min(1.0, trial.get(name, 0.0) + float(step)), 6)
                predicted = widened_params(spec, model_a, _widths(spec, trial)) - params
            if predicted <= 0 or (params + predicted > limit and common.get("assignment", "forced") == "forced"):
                continue  # forced assignment uses every buffer unit: the count from shapes is exact
            res = partial_widen(model_a, model_b, alignment, partial=trial, **common)
            if name in res.frozen or res.widths[name][1] == res.widths[name][0]:
                out.frozen[name] = res.frozen.get(name, "no unit pulled apart at gamma 1 or below")
                continue
            added = res.params - params  # what was built (adaptive assignment may split fewer pairs)
            if added <= 0 or res.params > limit:
                continue
            out.evaluations += 1
            try:
                gain = _metric(evaluate(res.module)) - score
            except ValueError as e:
                log.warning("benefit greedy: group %s at gamma %g: %s; the group is left out", name, trial[name], e)
                out.frozen[name] = str(e)
                continue
            log.debug("benefit greedy: %s -> %.3g gains %.4g for %d parameters", name, trial[name], gain, added)
            if best is None or gain / added > best[0]:
                best = (gain / added, gain, trial, res.params)
        if best is None or best[1] <= 0:
            break
        _, gain, gammas, params = best
        score += gain
        out.path.append(GreedyStep(dict(gammas), params, score))
        log.info("benefit greedy: %s (+%.1f%% parameters, score %.4g)", gammas, 100 * (params / base - 1), score)
    return out
