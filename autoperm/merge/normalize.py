"""Normalization after merging. RESET (the Vanishing Feature paper, ../papers/003, section 4.2
and Appendix A.3): recompute every BatchNorm's running statistics on data, since the average of
two models' statistics does not describe the merged model's features.

BatchNorms come in two forms: ``nn.BatchNorm*`` modules (the user's models), and eval-mode
``aten._native_batch_norm_legit_no_training`` nodes reading buffers in a ``torch.fx.GraphModule``
(what `insert_perm_layers`, Preserve-First and partial merging emit). Both are reset the same
way: the data run with batch statistics, each running mean / variance set to the average over
batches of the batch mean / unbiased variance.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from .._data import check_samples, stat_inputs
from .._progress import progress

__all__ = ["reset_batchnorm", "has_batchnorm", "graph_batchnorms", "reset_graph_batchnorm"]

log = logging.getLogger(__name__)

_EVAL_BN = torch.ops.aten._native_batch_norm_legit_no_training.default


def _module_batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def graph_batchnorms(model: nn.Module) -> list[str]:
    """Names of the eval-mode BatchNorm nodes of a ``torch.fx.GraphModule`` whose running
    statistics are tensors of the module (``get_attr`` nodes); empty for other modules."""
    if not isinstance(model, torch.fx.GraphModule):
        return []
    return [n.name for n in model.graph.nodes if n.op == "call_function" and n.target is _EVAL_BN
            and all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in n.args[3:5])]


def _graph_parts(model: nn.Module) -> list[tuple[torch.fx.GraphModule, list[str]]]:
    """Every GraphModule in ``model`` (itself included) with its BatchNorm nodes."""
    return [(m, names) for m in model.modules() if (names := graph_batchnorms(m))]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm running statistics (modules or emitted graph nodes)."""
    return bool(_module_batchnorms(model) or _graph_parts(model))


def _batches(data: Iterable, n_inputs: int, what: str):
    batches = samples = 0
    for batch in progress(data, desc="BatchNorm reset"):
        x = stat_inputs(batch, n_inputs, what)
        if x[0].shape[0] < 2 and x[0].dim() <= 2:  # one value per channel: no batch statistics
            raise ValueError(f"{what} runs BatchNorm on batch statistics, which needs more than one value per "
                             f"channel; a batch in data= has {x[0].shape[0]} sample(s): merge small batches")
        yield x
        batches += 1
        samples += x[0].shape[0]
    if batches == 0:
        raise ValueError(f"{what} got no batches in data")
    check_samples(samples, what)


@torch.no_grad()
def reset_batchnorm(model: nn.Module, data: Iterable, n_inputs: int = 1) -> nn.Module:
    """Recompute BatchNorm running statistics of ``model`` (in place; pass a copy) as the exact
    average over ``data`` of the batch statistics (the mean, and the unbiased variance, of each
    batch, as ``momentum=None`` in training mode computes them), with every other module in eval
    mode (dropout off); ``num_batches_tracked`` keeps its value. BatchNorm nodes of emitted
    GraphModules, at the top or inside, are reset in the same pass. Returns the model in eval mode."""
    bns = _module_batchnorms(model)
    parts = [(gm, _BatchStats(gm, set(names))) for gm, names in _graph_parts(model)]
    saved = {m: m.momentum for m in bns}
    counts = {m: m.num_batches_tracked.clone() for m in bns if m.num_batches_tracked is not None}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches seen
    model.eval()
    for m in bns:
        m.train()
    for gm, runner in parts:
        gm.forward = runner.run  # an instance attribute: nn.Module.__call__ runs the graph with batch statistics
    try:
        for x in _batches(data, n_inputs, "normalize='reset'"):
            model(*x)
    finally:
        for gm, _ in parts:
            del gm.forward
        for m, mom in saved.items():
            m.momentum = mom
        for m, n in counts.items():  # an integer buffer: model_a's, as every other one (not the batches seen here)
            m.num_batches_tracked.copy_(n)
    for gm, runner in parts:
        runner.write()
    log.info("reset %d BatchNorm layers and %d BatchNorm nodes", len(bns), sum(len(r.keys) for _, r in parts))
    return model.eval()


class _BatchStats(torch.fx.Interpreter):
    """Runs a GraphModule with the chosen eval-mode BatchNorm nodes on batch statistics and
    accumulates, per pair of running-statistics tensors (a BatchNorm used twice is one pair),
    the batch mean and unbiased variance of every call."""

    def __init__(self, gm: torch.fx.GraphModule, bns: set[str]) -> None:
        super().__init__(gm)
        self.keys = {n.name: (n.args[3].target, n.args[4].target) for n in gm.graph.nodes if n.name in bns}
        self.sums: dict[tuple[str, str], list] = {}

    def run_node(self, n: torch.fx.Node):
        if n.name not in self.keys:
            return super().run_node(n)
        x, w, b, _, _, momentum, eps = self.map_nodes_to_values(n.args, n)
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        count = x.numel() // x.shape[1]
        acc = self.sums.setdefault(self.keys[n.name], [0, 0.0, 0.0])
        acc[0] += 1
        acc[1] = acc[1] + mean
        acc[2] = acc[2] + var * (count / max(count - 1, 1))
        return _EVAL_BN(x, w, b, mean, var, momentum, eps)

    def write(self) -> None:
        """Set each pair of running statistics to the averages accumulated so far."""
        for (rm, rv), (count, s, sq) in self.sums.items():
            for target, value in ((rm, s / count), (rv, sq / count)):
                buf = _tensor(self.module, target)
                buf.copy_(value.to(buf.dtype))


@torch.no_grad()
def reset_graph_batchnorm(module: torch.fx.GraphModule, names: list[str], data: Iterable,
                          n_inputs: int = 1) -> None:
    """RESET for the BatchNorm nodes ``names`` of an emitted GraphModule (in place): their
    running statistics become the average of their batch statistics over ``data``, every other
    node running as it is. Example::

        reset_graph_batchnorm(pfm_module, graph_batchnorms(pfm_module), [x_train])
    """
    if not names:
        log.info("normalize='reset': no BatchNorm to reset")
        return
    runner = _BatchStats(module, set(names))
    for x in _batches(data, n_inputs, "normalize='reset'"):
        runner.run(*x)
    runner.write()
    log.info("reset %d BatchNorm nodes of an emitted module", len(names))


def _tensor(module: nn.Module, target: str) -> torch.Tensor:
    try:
        return module.get_buffer(target)
    except AttributeError:
        return module.get_parameter(target)
