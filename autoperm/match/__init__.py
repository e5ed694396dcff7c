"""Matchers: find the permutations that line model B up with model A.

All matchers share one signature and live in one table, `METHODS`. ``"identity"`` is naive
averaging (no alignment), the baseline every benchmark reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..permute import identity_permutation
from ..spec import PermutationSpec
from .weight import solve_assignment, unit_matrix, weight_matching

__all__ = ["Alignment", "METHODS", "solve_assignment", "unit_matrix", "weight_matching"]


@dataclass
class Alignment:
    """What a matcher found: ``perms`` to apply to model B, the objective per pass, timings."""

    perms: dict[str, torch.Tensor]
    method: str
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    spec: PermutationSpec | None = None


def _identity(spec, a, b, *, seed=0, **_):
    return identity_permutation(spec), []


def _weight(spec, a, b, *, seed=0, max_iter=100, **_):
    return weight_matching(spec, a, b, seed=seed, max_iter=max_iter)


Matcher = Callable[..., tuple[dict[str, torch.Tensor], list[float]]]
METHODS: dict[str, Matcher] = {"identity": _identity, "weight": _weight}


def run_matcher(method: str, spec: PermutationSpec, a: Mapping[str, torch.Tensor],
                b: Mapping[str, torch.Tensor], **kwargs) -> tuple[dict[str, torch.Tensor], list[float]]:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not available; choose one of {sorted(METHODS)}")
    return METHODS[method](spec, a, b, **kwargs)
