"""Normalization after merging. RESET (the Vanishing Feature paper, ../papers/003, section 4.2
and Appendix A.3): recompute every BatchNorm's running statistics on data, since the average of
two models' statistics does not describe the merged model's features."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from .._data import check_samples, stat_inputs
from .._progress import progress

__all__ = ["reset_batchnorm", "has_batchnorm"]

log = logging.getLogger(__name__)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def reset_batchnorm(model: nn.Module, data: Iterable, n_inputs: int = 1) -> nn.Module:
    """Recompute BatchNorm running statistics of ``model`` (in place; pass a copy) as the exact
    average over ``data``; ``num_batches_tracked`` keeps its value. Returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = {m: m.momentum for m in bns}
    counts = {m: m.num_batches_tracked.clone() for m in bns if m.num_batches_tracked is not None}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches seen
    model.train()
    batches = samples = 0
    try:
        for batch in progress(data, desc="BatchNorm reset"):
            x = stat_inputs(batch, n_inputs, "normalize='reset'")
            if x[0].shape[0] < 2:
                raise ValueError("normalize='reset' runs BatchNorm in training mode, which needs at least 2 "
                                 f"samples per batch; a batch in data= has {x[0].shape[0]}: merge small batches")
            model(*x)
            batches += 1
            samples += x[0].shape[0]
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        for m, n in counts.items():  # an integer buffer: model_a's, as every other one (not the batches seen here)
            m.num_batches_tracked.copy_(n)
    if batches == 0:
        raise ValueError("normalize='reset' got no batches in data")
    check_samples(samples, "normalize='reset'")
    log.info("reset %d BatchNorm layers over %d batches", len(bns), batches)
    return model.eval()
