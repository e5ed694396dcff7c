"""Linear assignment, shared by every matcher: the permutation that maximizes a cost matrix's
trace, and a tensor's unit rows as a matrix."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..permute import unit_rows
from ..spec import Axis

__all__ = ["solve_assignment", "unit_matrix"]


def unit_matrix(t: torch.Tensor, axis: Axis, size: int) -> torch.Tensor:
    """The slots of ``axis`` in ``t`` as a ``(size, -1)`` matrix (`autoperm.permute.unit_rows`)."""
    return unit_rows(t, axis, size)


def solve_assignment(cost: torch.Tensor) -> torch.Tensor:
    """The permutation p maximizing ``sum_i cost[i, p[i]]`` (deterministic: scipy's LAP)."""
    rows, cols = linear_sum_assignment(np.asarray(cost.detach().cpu().numpy(), dtype=np.float64), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm
