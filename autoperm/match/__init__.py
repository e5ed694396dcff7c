"""Matchers: find the permutations that line model B up with model A.

All matchers share one signature and live in one table, `METHODS`. ``"identity"`` is naive
averaging (no alignment), the baseline every benchmark reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from ..permute import identity_permutation
from ..spec import PermutationSpec
from .activation import activation_matching
from .weight import solve_assignment, unit_matrix, weight_matching

__all__ = ["Alignment", "MatchContext", "METHODS", "NEEDS_DATA", "activation_matching", "solve_assignment", "unit_matrix", "weight_matching"]


@dataclass
class Alignment:
    """What a matcher found: ``perms`` to apply to model B, the objective per pass, timings."""

    perms: dict[str, torch.Tensor]
    method: str
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    spec: PermutationSpec | None = None
    traced: Any = field(default=None, repr=False)  # model_a's TracedGraph, reused by REPAIR


@dataclass
class MatchContext:
    """Everything a matcher may use. Weight matching reads only the spec and the state dicts."""

    spec: PermutationSpec
    state_a: Mapping[str, torch.Tensor]
    state_b: Mapping[str, torch.Tensor]
    seed: int = 0
    max_iter: int = 100
    data: Iterable | None = None
    traced: Any = None   # autoperm.frontend.TracedGraph of model_a
    sites: Any = None    # group name -> list[autoperm.analysis.Site]
    features: str = "pre"


def _identity(ctx: MatchContext):
    return identity_permutation(ctx.spec), []


def _weight(ctx: MatchContext):
    return weight_matching(ctx.spec, ctx.state_a, ctx.state_b, seed=ctx.seed, max_iter=ctx.max_iter)


def _activation(ctx: MatchContext):
    return activation_matching(ctx.spec, ctx.traced, ctx.sites, ctx.state_a, ctx.state_b, ctx.data,
                               features=ctx.features)


Matcher = Callable[[MatchContext], tuple[dict[str, torch.Tensor], list[float]]]
METHODS: dict[str, Matcher] = {"identity": _identity, "weight": _weight, "activation": _activation}
NEEDS_DATA = {"activation"}


def run_matcher(method: str, ctx: MatchContext) -> tuple[dict[str, torch.Tensor], list[float]]:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not available; choose one of {sorted(METHODS)}")
    return METHODS[method](ctx)
