"""How autoperm reads ``data``: an iterable of batches, each a Tensor (the input) or a tuple /
list whose first ``n_inputs`` items are the inputs and whose next item, if any, is the target."""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["batch_inputs", "batch_target", "first_inputs", "stat_inputs", "check_samples", "float_dtype"]


def float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter (None without one): what its
    inputs should be cast to."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def batch_inputs(batch: Any, n_inputs: int = 1) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and len(batch) >= n_inputs:
        return tuple(batch[:n_inputs])
    raise ValueError(f"a batch must be a Tensor or a tuple / list of at least {n_inputs} tensors, "
                     f"got {type(batch).__name__}")


def batch_target(batch: Any, n_inputs: int = 1):
    if isinstance(batch, (tuple, list)) and len(batch) > n_inputs:
        return batch[n_inputs]
    return None


def first_inputs(data: Iterable, n_inputs: int = 1) -> tuple[torch.Tensor, ...] | None:
    for batch in data:
        return batch_inputs(batch, n_inputs)
    return None


def stat_inputs(batch: Any, n_inputs: int, what: str) -> tuple[torch.Tensor, ...]:
    """`batch_inputs` of a batch that statistics are measured on: a batch without rows or with
    non-finite inputs raises a ValueError naming ``data=`` (they would write NaN or zero weights)."""
    x = batch_inputs(batch, n_inputs)
    if not x or not isinstance(x[0], torch.Tensor) or x[0].dim() == 0 or x[0].shape[0] == 0:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in x]
        raise ValueError(f"{what}: a batch in data= has no rows (input shapes {shapes}); drop empty batches")
    for t in x:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: a batch in data= holds non-finite inputs (NaN / inf); statistics "
                             "measured on them would make the merged weights non-finite")
    return x


def check_samples(count: int, what: str) -> None:
    """Statistics need a spread: at least two samples over all of ``data``."""
    if count < 2:
        raise ValueError(f"{what} needs at least 2 samples in data= to measure per-channel statistics, got "
                         f"{count}; pass more input batches")
