"""How autoperm reads ``data``: an iterable of batches, each a Tensor (the input) or a tuple /
list whose first ``n_inputs`` items are the inputs and whose next item, if any, is the target."""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["batch_inputs", "batch_target", "first_inputs"]


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
